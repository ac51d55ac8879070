"""The engine's operations on a TransformerLens 4 `TransformerBridge` (compatibility mode).

A bridge runs the Hugging Face model's own forward: its blocks cannot be called one at a time the
way `HookedTransformer.blocks[i]` can (each Hugging Face layer wants its rotary tables, masks and
cache object from the model's forward), and in compatibility mode (TransformerLens 4.3) its
attention ignores a Hugging Face key/value cache (a suffix run with the prefix's cache gives wrong
logits). So where the HookedTransformer engine steps block by block over the changed positions
only, here every pass is one forward of the whole model over every position:

- each row enters at layer 0 as the recorded row whose prefix it continues, and a hook on
  `blocks.L.hook_resid_pre` writes the row's own residual over positions `start_pos..` at its
  layer (what the row computed there below that layer is discarded; kvmem's hooks never touch a
  row below the layer it joins at); the positions before `start_pos` recompute the recorded run;
- the caller's hooks see only positions `start_pos..`, numbered from 0, as on the other backend;
- the pass stops right after the last block (a hook raises `_Stop`), so no position is unembedded
  here; callers unembed only the positions they read (`kvmem.core.readout.final_logits`).

The numbers equal the HookedTransformer engine's to float32 rounding (tests/test_backends.py);
the cost does not: a row restoring (layer l, position t) also runs layers below l and positions
before t (benchmarks/results/backends/ has the ratio).
"""

from __future__ import annotations

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


def final_resid(model, inputs: Tensor, *, fwd_hooks: Sequence[tuple[str, Callable]] = (),
                start_at_layer: int | None = None, past_key_values=None, **kwargs) -> Tensor:
    """The residual stream after the last block (before the final norm) for `inputs` (token ids,
    or with `start_at_layer` the residual entering that layer). Stops before the unembedding."""
    hooks = list(fwd_hooks) + [(_last_resid_hook(model), _stop_hook)]
    try:
        with model.hooks(fwd_hooks=hooks):
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
           keep: Sequence[tuple[str, Callable]]) -> list[Tensor]:
    """Run `tokens` once with `fwd_hooks` (and the recording hooks `keep`); the residual entering
    every layer, plus the final one."""
    n_layers = model.cfg.n_layers
    resids: dict[int, Tensor] = {}

    def keep_resid(layer):
        def hook(activation, hook=None):
            resids[layer] = activation.detach().clone()
            return activation
        return hook

    hooks = list(fwd_hooks) + list(keep)
    hooks += [(f"blocks.{l}.hook_resid_pre", keep_resid(l)) for l in range(n_layers)]
    resids[n_layers] = final_resid(model, tokens, fwd_hooks=hooks).detach().clone()
    return [resids[l] for l in range(n_layers + 1)]


def _write_rows(lo: int, resid: Tensor, start_pos: int) -> Callable:
    def hook(activation: Tensor, hook=None) -> Tensor:
        out = activation.clone()
        out[lo : lo + resid.shape[0], start_pos:] = resid.to(activation.dtype)
        return out
    return hook


def _on_suffix(fn: Callable, start_pos: int) -> Callable:
    """`fn` applied to positions `start_pos..` only, as the HookedTransformer engine's hooks see them."""
    if start_pos == 0:
        return fn

    def hook(activation: Tensor, hook=None) -> Tensor:
        out = fn(activation[:, start_pos:], hook)
        if out is None:
            return activation
        return torch.cat([activation[:, :start_pos], out], dim=1)
    return hook


def forward_rows(model, run, groups, start_pos: int, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
    """`kvmem.core.engine.forward_rows` on a bridge: one forward over every position, each group
    written in at its layer; returns positions `start_pos..` of the final residual."""
    n_layers = model.cfg.n_layers
    kv_rows = [r for g in groups for r in g.kv_rows]
    prefix = run.resid[0]
    if run.n_rows == 1:
        x = prefix.expand(len(kv_rows), -1, -1)
    else:
        x = prefix[torch.tensor(kv_rows, device=prefix.device)]
    joins, lo = [], 0
    for g in groups:
        name = f"blocks.{g.layer}.hook_resid_pre" if g.layer < n_layers else _last_resid_hook(model)
        joins.append((name, _write_rows(lo, g.resid, start_pos)))
        lo += g.resid.shape[0]
    hooks = joins + [(name, _on_suffix(fn, start_pos)) for name, fn in fwd_hooks]  # joins first
    return final_resid(model, x, fwd_hooks=hooks, start_at_layer=0)[:, start_pos:]


@contextmanager
def decoding(model, n_rows: int, device=None) -> Iterator[Callable[[Tensor], Tensor]]:
    """Incremental decoding without a key/value cache (the bridge's compatibility mode ignores it):
    yields `step(tokens) -> final residual of those tokens`, each call rerunning all tokens so far."""
    seen: list[Tensor] = []

    def step(tokens: Tensor) -> Tensor:
        seen.append(tokens)
        full = torch.cat(seen, dim=1)
        return final_resid(model, full)[:, -tokens.shape[1]:]

    yield step


__all__ = ["final_resid", "run_to_layer", "record", "forward_rows", "decoding"]
