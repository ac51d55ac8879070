"""A layer's memories on given tokens: key coefficients, and their weighted sum of values."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.core.backend import run_to_layer
from kvmem.core.hooks import capture
from kvmem.core.weights import check_layer, hook_post_name, mlp_post_norm, mlp_weights


@torch.no_grad()
def memory_coefficients(model, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch pos d_mlp"]:
    """`hook_post` of `layer` (each key's coefficient at each position); the forward stops after it."""
    layer = check_layer(model, layer)
    name = hook_post_name(model, layer)
    store = {}
    with model.hooks(fwd_hooks=[(name, capture(store, "a", clone=True))]):
        run_to_layer(model, tokens.to(model.W_U.device), layer + 1)
    return store["a"]


def memory_sum(
    model,
    coefficients: Float[Tensor, "*batch d_mlp"],
    layer: int,
    *,
    bias: bool = True,
    post_norm: bool = True,
) -> Float[Tensor, "*batch d_model"]:
    """Sum over memories of coefficient x value (+ `b_out` unless `bias=False`), then the block's
    post-MLP norm where it has one (Gemma 2/3) unless `post_norm=False`: `hook_mlp_out`."""
    layer = check_layer(model, layer)
    w = mlp_weights(model, layer)
    out = coefficients.to(device=w.W_out.device, dtype=w.W_out.dtype) @ w.W_out
    if bias and w.b_out is not None:
        out = out + w.b_out
    norm = mlp_post_norm(model, layer)
    if post_norm and norm is not None:
        shape = out.shape
        out = norm(out.reshape(-1, 1, shape[-1])).reshape(shape)
    return out
