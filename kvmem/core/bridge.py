"""The engine's operations on a TransformerLens 4 `TransformerBridge` (compatibility mode).

A bridge runs the Hugging Face model's own forward: its blocks cannot be called one at a time the
way `HookedTransformer.blocks[i]` can (each Hugging Face layer wants its rotary tables, masks and
cache object from the model's forward). So where the HookedTransformer engine steps block by block,
here every pass is one forward of the whole model, over the changed positions only:

- positions before `start_pos` are not recomputed: the recorded keys/values are handed to the model
  as its Hugging Face key/value cache, so positions (rotary offsets, learned positions) continue
  the prefix. TransformerLens 4.3's attention reads the cache from a `past_key_values` argument,
  which transformers 5.25's layers now pass as `cache` (its generate() with the default cache
  returns wrong tokens); `_cache_passed_to_attention` hands it over, for kvmem's passes only;
- every row enters at layer 0 and a hook on `blocks.L.hook_resid_pre` writes each row group's
  residual in at its layer (what a row computed below that layer is discarded; kvmem's hooks never
  touch a row below the layer it joins at);
- the pass stops right after the last block (a hook raises `_Stop`), so no position is unembedded
  here; callers unembed only the positions they read (`kvmem.core.readout.final_logits`).

The numbers equal the HookedTransformer engine's to float32 rounding (tests/test_golden.py,
tests/test_patching.py); the cost differs: a row joining at layer L also runs layers 0..L-1
(benchmarks/results/backends/ has the ratio).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor


class _Stop(Exception):
    """Raised by the hook after the last block: the forward has produced what the caller needs."""

    def __init__(self, resid: Tensor):
        super().__init__()
        self.resid = resid


def _last_resid_hook(model) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def _stop_hook(activation: Tensor, hook=None) -> Tensor:
    raise _Stop(activation)


def _hand_cache_over(module, args, kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
    return args, kwargs


@contextmanager
def _cache_passed_to_attention(model) -> Iterator[None]:
    """Within the block, each block's attention receives the layer's key/value cache under the name
    it reads (`past_key_values`) when the Hugging Face layer passes it as `cache`."""
    handles = [block.attn.register_forward_pre_hook(_hand_cache_over, with_kwargs=True)
               for block in model.blocks if getattr(block, "attn", None) is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def new_cache(model):
    """An empty Hugging Face key/value cache for the bridge's model (its sliding layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.original_model.config)


def cache_from(model, keys: Sequence[Tensor], values: Sequence[Tensor]):
    """A Hugging Face cache holding `keys[l]` / `values[l]` (`[row, pos, kv_head, d_head]`, the
    layout kvmem records) for every layer."""
    cache = new_cache(model)
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
    return cache


def final_resid(model, inputs: Tensor, *, fwd_hooks: Sequence[tuple[str, Callable]] = (),
                start_at_layer: int | None = None, past_key_values=None, **kwargs) -> Tensor:
    """The residual stream after the last block (before the final norm) for `inputs` (token ids,
    or with `start_at_layer` the residual entering that layer), continuing `past_key_values` when
    given (which the pass extends). Stops before the unembedding."""
    hooks = list(fwd_hooks) + [(_last_resid_hook(model), _stop_hook)]
    try:
        with model.hooks(fwd_hooks=hooks), _cache_passed_to_attention(model), warnings.catch_warnings():
            # transformers 5.25 renames the argument TransformerLens 4.3 passes the cache by
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            model(inputs, start_at_layer=start_at_layer, past_key_values=past_key_values, **kwargs)
    except _Stop as stop:
        return stop.resid
    raise RuntimeError("The bridge's forward ended without passing its last block's hook_resid_post.")


def run_to_layer(model, tokens: Tensor, layer: int, **kwargs) -> Tensor:
    """The residual entering block `layer` (`n_layers`: after the last block)."""
    if layer >= model.cfg.n_layers:
        return final_resid(model, tokens, **kwargs)
    return model(tokens, stop_at_layer=layer, **kwargs)


def record(model, tokens: Tensor, fwd_hooks: Sequence[tuple[str, Callable]],
           keep: Sequence[tuple[str, Callable]]):
    """Run `tokens` once with `fwd_hooks` (and the recording hooks `keep`); the residual entering
    every layer plus the final one, and every layer's keys and values (`[row, pos, kv_head, d_head]`)."""
    n_layers = model.cfg.n_layers
    resids: dict[int, Tensor] = {}

    def keep_resid(layer):
        def hook(activation, hook=None):
            resids[layer] = activation.detach().clone()
            return activation
        return hook

    hooks = list(fwd_hooks) + list(keep)
    hooks += [(f"blocks.{l}.hook_resid_pre", keep_resid(l)) for l in range(n_layers)]
    cache = new_cache(model)
    resids[n_layers] = final_resid(model, tokens, fwd_hooks=hooks, past_key_values=cache).detach().clone()
    keys = tuple(cache.layers[l].keys.detach().transpose(1, 2) for l in range(n_layers))
    values = tuple(cache.layers[l].values.detach().transpose(1, 2) for l in range(n_layers))
    return [resids[l] for l in range(n_layers + 1)], keys, values


def _write_rows(lo: int, resid: Tensor) -> Callable:
    def hook(activation: Tensor, hook=None) -> Tensor:
        out = activation.clone()
        out[lo : lo + resid.shape[0]] = resid.to(activation.dtype)
        return out
    return hook


def forward_rows(model, run, groups, start_pos: int, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
    """`kvmem.core.engine.forward_rows` on a bridge: one forward over positions `start_pos..`, each
    group written in at its layer, the recorded prefix as the key/value cache."""
    n_layers = model.cfg.n_layers
    # every row enters at layer 0 with its own residual; a group joining later overwrites it there
    x = torch.cat([g.resid for g in groups])
    joins, lo = [], 0
    for g in groups:
        if g.layer > 0:
            name = f"blocks.{g.layer}.hook_resid_pre" if g.layer < n_layers else _last_resid_hook(model)
            joins.append((name, _write_rows(lo, g.resid)))
        lo += g.resid.shape[0]
    past = None
    if start_pos > 0:
        kv_rows = [r for g in groups for r in g.kv_rows]
        index = None if run.n_rows == 1 else torch.tensor(kv_rows, device=run.keys[0].device)

        def prefix(t: Tensor) -> Tensor:
            t = t[:, :start_pos]
            return t.expand(len(kv_rows), -1, -1, -1) if index is None else t[index]

        past = cache_from(model, [prefix(k) for k in run.keys], [prefix(v) for v in run.values])
    # joins first: the caller's hooks at a join layer see the joined rows
    return final_resid(model, x, fwd_hooks=joins + list(fwd_hooks), start_at_layer=0, past_key_values=past)


@contextmanager
def decoding(model, n_rows: int, device=None) -> Iterator[Callable[[Tensor], Tensor]]:
    """Incremental decoding: yields `step(tokens) -> final residual of those tokens`, each call
    attending to every token given before (a Hugging Face cache held for the block)."""
    cache = new_cache(model)

    def step(tokens: Tensor) -> Tensor:
        return final_resid(model, tokens, past_key_values=cache)

    yield step


__all__ = ["final_resid", "run_to_layer", "record", "forward_rows", "decoding", "new_cache", "cache_from"]
