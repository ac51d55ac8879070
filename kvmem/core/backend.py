"""Which TransformerLens a model comes from, and the few operations that differ between them.

kvmem runs on two model kinds:

- `HookedTransformer` (TransformerLens 3.x): kvmem's reference backend, "hooked";
- `TransformerBridge` (TransformerLens >= 4.3) in compatibility mode ("bridge"): the Hugging Face
  model wrapped, with LayerNorm folded and weights centred as HookedTransformer does
  (`bridge.enable_compatibility_mode()`), so legacy hook names (`blocks.L.hook_mlp_out`,
  `blocks.L.mlp.hook_post`, `hook_embed`, ...) and `W_in`/`W_out`/`W_U` mean what they mean on a
  HookedTransformer.

Everything that depends on the kind lives in `kvmem.core`; analyses call these functions and never
ask which kind they hold.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from kvmem.errors import InvalidArgumentError

Backend = Literal["hooked", "bridge"]
BACKENDS: tuple[str, ...] = ("hooked", "bridge")

# Hugging Face architectures whose compatibility-mode bridge kvmem has checked against the
# HookedTransformer of the same weights (tests/test_golden.py, benchmarks/results/backends/):
# factworld (GPT-2), Gemma-3-270m, SmolLM2-135M (Llama). Another architecture is refused; to try one
# anyway, add its name here (`kvmem.core.backend.CHECKED_ARCHITECTURES.add(name)`) and compare its
# numbers with a HookedTransformer of the same weights first.
CHECKED_ARCHITECTURES: set[str] = {"GPT2LMHeadModel", "Gemma3ForCausalLM", "LlamaForCausalLM"}


def installed_backend() -> Backend:
    """The backend of the installed TransformerLens: "bridge" from 4.x on, "hooked" before."""
    from importlib.metadata import version

    major = int(version("transformer-lens").split(".")[0])
    return "bridge" if major >= 4 else "hooked"


def _is_bridge(model) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return isinstance(model, TransformerBridge)


def _is_hooked(model) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens 4 raises on the name
        return False
    return isinstance(model, HookedTransformer)


def backend_of(model) -> Backend:
    """"hooked" or "bridge" for a model kvmem can analyse; a clear error for anything else."""
    if _is_hooked(model):
        return "hooked"
    if _is_bridge(model):
        if not getattr(model, "compatibility_mode", False):
            raise InvalidArgumentError(
                "This TransformerBridge runs raw Hugging Face weights; kvmem's analyses read folded, "
                "centred weights (W_out rows as values, W_U as the unembedding, legacy hook names). "
                "Call bridge.enable_compatibility_mode() first (or load it with kvmem.load_model)."
            )
        arch = getattr(model.cfg, "architecture", None)
        if arch not in CHECKED_ARCHITECTURES:
            raise InvalidArgumentError(
                f"kvmem has not checked a TransformerBridge of {arch!r} (checked: "
                f"{', '.join(sorted(CHECKED_ARCHITECTURES))}): its hook points and weight layout may not "
                "mean what kvmem's analyses assume. Use a HookedTransformer (TransformerLens 3.9) for "
                "it, or add the name to kvmem.core.backend.CHECKED_ARCHITECTURES after comparing its "
                "numbers with a HookedTransformer of the same weights."
            )
        return "bridge"
    raise InvalidArgumentError(
        f"Expected a transformer_lens HookedTransformer (TransformerLens 3.x) or TransformerBridge "
        f"(TransformerLens 4.x), got {type(model).__name__}; load one with kvmem.load_model(...)."
    )


def is_bridge(model) -> bool:
    """Whether `model` is a (compatibility-mode) TransformerBridge; errors as `backend_of` does."""
    return backend_of(model) == "bridge"


def run_to_layer(model, tokens: Tensor, layer: int, **kwargs) -> Tensor:
    """The residual stream entering block `layer` for `tokens` (`layer == n_layers`: after the last
    block, before the final norm): `model(tokens, stop_at_layer=layer)` on a HookedTransformer.
    Hooks added with `model.hooks(...)` fire as in a plain forward, up to that point."""
    if is_bridge(model):
        from kvmem.core import bridge

        return bridge.run_to_layer(model, tokens, layer, **kwargs)
    return model(tokens, stop_at_layer=layer, **kwargs)


def continue_from(model, resid: Tensor, layer: int) -> Tensor:
    """The final residual (before the final norm) of a pass whose residual entering block
    `layer` is `resid` (`[batch, pos, d_model]`): gradients flow back to `resid`."""
    if is_bridge(model):
        from kvmem.core import bridge

        # the bridge runs blocks 0..layer-1 on `resid` and discards them (TransformerLens 4's own rule)
        return bridge.final_resid(model, resid, start_at_layer=layer)
    return model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)


@contextmanager
def decoding(model, n_rows: int, device=None) -> Iterator[Callable[[Tensor], Tensor]]:
    """Incremental decoding of `n_rows` rows: yields `step(tokens) -> final residual` (before the
    final norm) of the new tokens, each call attending to all tokens given in earlier calls."""
    if is_bridge(model):
        from kvmem.core import bridge

        with bridge.decoding(model, n_rows, device) as step:
            yield step
        return
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, n_rows)
    n_layers = model.cfg.n_layers

    def step(tokens: Tensor) -> Tensor:
        # an explicit all-ones mask: no token is ever treated as padding
        return model(tokens, stop_at_layer=n_layers, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))

    yield step


__all__ = ["Backend", "BACKENDS", "CHECKED_ARCHITECTURES", "installed_backend", "backend_of", "is_bridge", "run_to_layer",
           "continue_from", "decoding"]
