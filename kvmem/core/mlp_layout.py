"""Gated-MLP forwards that reuse transposed weights instead of copying them on every call.

TransformerLens's `GatedMLP.forward` (3.9) calls `F.linear(x, W.T.contiguous())` for W_gate, W_in
and W_out, so each forward copies the layer's three weight matrices. With a batch of many tokens
that copy is noise; when generating one token at a time it dominates: on Gemma-3-270m on one CPU
thread it was ~half of the time per new token. `pretransposed_mlps(model)` makes the transposed
copies once and runs the same operations in the same order on the same memory layout, so outputs
are bit-identical and every hook point still fires.

Only used without gradients (the copies are made under `no_grad`); a forward with gradients
enabled, or after a weight changed in place, falls back to TransformerLens's own forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


def _gated_mlp_class():
    try:
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
    except ImportError:  # another TransformerLens layout: nothing to speed up
        return None
    return GatedMLP


def _fast_forward(mlp, original):
    params = (mlp.W_gate, mlp.W_in, mlp.W_out)
    with torch.no_grad():
        gate_t, in_t, out_t = (w.T.contiguous() for w in params)
    versions = tuple(w._version for w in params)

    def forward(x):
        if torch.is_grad_enabled() or tuple(w._version for w in params) != versions or x.device != gate_t.device:
            return original(x)
        pre_act = mlp.hook_pre(F.linear(x, gate_t))
        pre_linear = mlp.hook_pre_linear(F.linear(x, in_t))
        post_act = mlp.hook_post(mlp.act_fn(pre_act) * pre_linear + mlp.b_in)
        return F.linear(post_act, out_t, mlp.b_out)

    return forward


@contextmanager
def pretransposed_mlps(model) -> Iterator[int]:
    """Within the block, the model's plain TransformerLens gated MLPs use transposed weights made
    once (yields how many); restored on exit, also on exceptions. Other MLPs are left alone."""
    cls = _gated_mlp_class()
    patched = []
    try:
        for block in getattr(model, "blocks", []):
            mlp = getattr(block, "mlp", None)
            if cls is None or type(mlp) is not cls or "forward" in vars(mlp):
                continue
            if mlp.cfg.is_layer_norm_activation() and getattr(mlp, "ln", None) is not None:
                continue  # the SoLU-style branch: not the path reproduced here
            mlp.forward = _fast_forward(mlp, mlp.forward)
            patched.append(mlp)
        yield len(patched)
    finally:
        for mlp in patched:
            vars(mlp).pop("forward", None)


__all__ = ["pretransposed_mlps"]
