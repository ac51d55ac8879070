"""Pieces the memory analyses share: argument checks and reading a direction through the unembedding.

Final-norm handling ("linear" readout). A value vector (or an MLP output) is a *change* to the
residual stream, not a residual state, so it has no norm scale of its own. kvmem reads it through
the final norm's linear part and the unembedding:

- LayerNorm-type final norms (LayerNorm, LayerNormPre) centre the vector (subtract its mean over
  d_model), exactly as the norm would;
- a final norm that still holds its gain (`ln_final.w`, i.e. the model was loaded *without*
  fold_ln) multiplies elementwise by it. With fold_ln (TransformerLens's default for pretrained
  models) that gain is already folded into `model.W_U` and is not applied twice;
- the data-dependent 1/scale (std or RMS of the residual) is dropped: it is one positive number
  per position, so it changes no ranking;
- `b_U` is left out: it is the same for every vector, it is not what a memory writes;
- output soft-capping is monotone and is left out as well.

`final_norm="none"` instead projects with `model.W_U` as it is held (Geva et al.'s `v @ E`).

Post-MLP norms (Gemma 2/3: `ln2_post`, `cfg.use_normalization_before_and_after`; OLMo 2 post-norm).
There the block writes `norm(sum_i c_i W_out[i] + b_out)`, not the sum itself. Its per-position
1/scale is shared by all memories of the layer, so memory i's write is `c_i * (W_out[i] * w_post)`
up to that positive number (centred first for a LayerNorm-type post-norm): `value_directions`
gives these vectors, and every analysis here reads values through them (identical to `W_out` for
GPT-2/Llama-style blocks).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.weights import check_neurons, final_norm_layer, mlp_post_norm, mlp_weights, norm_centres, norm_gain
from kvmem.errors import InvalidArgumentError

FinalNorm = Literal["linear", "none"]


def check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {k!r}; pass e.g. {name}=10.")
    return k


def check_final_norm(final_norm: str) -> str:
    if final_norm not in ("linear", "none"):
        raise InvalidArgumentError(f"final_norm must be 'linear' or 'none', got {final_norm!r}.")
    return final_norm


def resolve_neurons(model, neurons: Sequence[int] | Tensor | None) -> Tensor:
    """Neuron indices as a 1-d long tensor (all of d_mlp when None), each checked."""
    if neurons is None:
        return torch.arange(model.cfg.d_mlp)
    if isinstance(neurons, Tensor):
        if neurons.dim() != 1 or neurons.is_floating_point():
            raise InvalidArgumentError("neurons must be a 1-d integer tensor or a list of ints.")
        neurons = neurons.tolist()
    if isinstance(neurons, int):
        raise InvalidArgumentError(f"neurons must be a list of ints, got the int {neurons}; pass [{neurons}].")
    out = check_neurons(model, neurons)
    if not out:
        raise InvalidArgumentError("neurons is empty; pass None for all neurons or at least one index.")
    return torch.tensor(out, dtype=torch.long)


def value_directions(
    model, layer: int, rows: Float[Tensor, "n d_model"] | None = None
) -> Float[Tensor, "n d_model"]:
    """What each value writes into the residual per unit of coefficient, up to the post-MLP
    norm's positive per-position 1/scale: `W_out` rows (all, or `rows`) times the post-norm's
    gain (centred first for LayerNorm). Unchanged (a view) for blocks without a post-MLP norm."""
    v = mlp_weights(model, layer).W_out if rows is None else rows
    norm = mlp_post_norm(model, layer)
    if norm is None:
        return v
    if norm_centres(model, norm):
        v = v - v.mean(-1, keepdim=True)
    w = norm_gain(model, norm)
    if w is not None:
        v = v * w.to(v.dtype)
    return v


def _centers(model) -> bool:
    return norm_centres(model, final_norm_layer(model))


def _gain(model) -> Tensor | None:
    return norm_gain(model, final_norm_layer(model))


def readout_directions(
    model, vectors: Float[Tensor, "n d_model"], final_norm: FinalNorm = "linear"
) -> Float[Tensor, "n d_model"]:
    """`vectors` mapped so that `result @ model.W_U` is their (linearised) effect on the logits."""
    x = vectors.to(model.W_U.dtype)
    if final_norm == "none":
        return x
    if _centers(model):
        x = x - x.mean(-1, keepdim=True)
    g = _gain(model)
    if g is not None:
        x = x * g.to(x.dtype)
    return x


def readout_logits(
    model, vectors: Float[Tensor, "n d_model"], final_norm: FinalNorm = "linear"
) -> Float[Tensor, "n d_vocab"]:
    """Linearised logit effect of residual-stream *changes* (see the module docstring)."""
    return readout_directions(model, vectors, final_norm) @ model.W_U


def unembed_column(model, token: int, final_norm: FinalNorm = "linear") -> Float[Tensor, "d_model"]:
    """The direction r with `v @ r` = the linear readout of `v` at `token`'s logit."""
    r = model.W_U[:, token].clone()
    if final_norm == "none":
        return r
    g = _gain(model)
    if g is not None:
        r = r * g.to(r.dtype)
    if _centers(model):
        r = r - r.mean()
    return r


def decode_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) if int(i) >= 0 else "" for i in ids]
