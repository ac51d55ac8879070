"""MLP and unembedding weights under one vocabulary, whatever the architecture.

A TransformerLens MLP computes `post = act(x W_in + b_in)` (GPT-2) or
`post = act(x W_gate) * (x W_in + b_in)` (gated: Gemma, Llama), then `out = post W_out + b_out`.
Either way `hook_post` holds the key coefficients and row i of `W_out` is value i, so analyses
written against this module never branch on the model type.

Also here: layer checks, the norms around the MLP and before the unembedding (`mlp_post_norm`,
`final_norm_layer` and the hooks of their per-position scales) and token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jaxtyping import Float, Int
from torch import Tensor

from kvmem.core.backend import is_bridge
from kvmem.core.hooks import has_hook
from kvmem.errors import InvalidArgumentError, LayerOutOfRangeError


def check_layer(model, layer: int) -> int:
    """`layer` as a non-negative index, or a LayerOutOfRangeError that says the valid range."""
    n = model.cfg.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LayerOutOfRangeError(f"layer must be an int in [0, {n - 1}], got {layer!r}.")
    if not -n <= layer < n:
        raise LayerOutOfRangeError(f"layer {layer} is out of range: this model has layers 0..{n - 1}.")
    return layer % n


def check_layers(model, layers: int | Sequence[int] | None) -> list[int]:
    """`layers` as sorted, distinct, non-negative indices: None means every layer, an int one layer.

    Each is checked by `check_layer` (LayerOutOfRangeError); an empty selection is an
    InvalidArgumentError (it is not out of range, it selects nothing).
    """
    if layers is None:
        return list(range(model.cfg.n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = sorted({check_layer(model, l) for l in layers})
    if not out:
        raise InvalidArgumentError(
            f"layers is empty; pass None for all layers 0..{model.cfg.n_layers - 1} or some layer indices."
        )
    return out


def check_neurons(model, neurons) -> list[int]:
    """Neuron indices as a list, each checked against d_mlp."""
    d_mlp = model.cfg.d_mlp
    out = [int(i) for i in neurons]
    bad = [i for i in out if not 0 <= i < d_mlp]
    if bad:
        raise LayerOutOfRangeError(f"neurons {bad[:5]} out of range: this model's MLPs have 0..{d_mlp - 1}.")
    return out


def hook_post_name(model, layer: int) -> str:
    """The hook holding layer `layer`'s key coefficients (post-activation, gated product included)."""
    return f"blocks.{check_layer(model, layer)}.mlp.hook_post"


def is_gated(model) -> bool:
    return bool(getattr(model.cfg, "gated_mlp", False))


@dataclass(frozen=True)
class MLPWeights:
    """Views (not copies) of one MLP's parameters. `W_gate` is None for ungated MLPs."""

    layer: int
    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, "d_mlp"] | None
    W_gate: Float[Tensor, "d_model d_mlp"] | None
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, "d_model"] | None

    @property
    def keys(self) -> Float[Tensor, "d_mlp d_model"]:
        """Key i as a vector in the residual stream (column i of `W_in`)."""
        return self.W_in.T

    @property
    def values(self) -> Float[Tensor, "d_mlp d_model"]:
        """Value i, the vector written to the residual per unit of coefficient (row i of `W_out`)."""
        return self.W_out


def mlp_weights(model, layer: int) -> MLPWeights:
    """The MLP parameters of `layer`; editing `W_out` in place edits the model."""
    layer = check_layer(model, layer)
    mlp = model.blocks[layer].mlp
    if not hasattr(mlp, "W_out"):
        raise LayerOutOfRangeError(
            f"Layer {layer}'s MLP ({type(mlp).__name__}) has no dense W_out; kvmem supports dense MLPs only."
        )
    return MLPWeights(
        layer=layer,
        W_in=mlp.W_in,
        b_in=getattr(mlp, "b_in", None),
        W_gate=getattr(mlp, "W_gate", None) if is_gated(model) else None,
        W_out=mlp.W_out,
        b_out=getattr(mlp, "b_out", None),
    )


def mlp_post_norm(model, layer: int):
    """The norm a block applies to its MLP output before the residual add, or None."""
    block = model.blocks[layer]
    norm = None
    if is_bridge(model):
        # the bridge names a post-MLP norm `ln2_post` whatever its config says (Gemma-2/3)
        norm = getattr(block, "ln2_post", None)
    elif getattr(model.cfg, "use_normalization_before_and_after", False):
        norm = getattr(block, "ln2_post", None)
    else:
        try:
            from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES
        except ImportError:  # pragma: no cover - older TransformerLens
            POST_NORM_ARCHITECTURES = ()
        if getattr(model.cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES:
            norm = getattr(block, "ln2", None)
    if norm is None or not hasattr(norm, "hook_scale"):
        return None
    return norm


def norm_centres(model, norm) -> bool:
    """Whether `norm` subtracts the mean before scaling (LayerNorm) rather than not (RMSNorm)."""
    if norm is None:
        return False
    if is_bridge(model):
        name = type(norm.original_component).__name__
        return "LayerNorm" in name and "RMS" not in name
    return type(norm).__name__ in ("LayerNorm", "LayerNormPre")


def norm_gain(model, norm) -> Tensor | None:
    """The per-dimension gain `norm` multiplies the normalised vector by; None where it has none
    (folded into the next weights). A bridge wraps the Hugging Face module as it is: Gemma's RMSNorm
    stores w and multiplies by 1 + w (a HookedTransformer holds 1 + w); other norms multiply by w."""
    if norm is None:
        return None
    if is_bridge(model):
        module = norm.original_component
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor):
            return None
        name = type(module).__name__
        if name.startswith("Gemma") and "RMSNorm" in name:
            return (1.0 + w.float()).to(w.dtype)
        return w
    w = getattr(norm, "w", None)
    return w if isinstance(w, Tensor) else None


def post_norm_scale_name(model, layer: int) -> str | None:
    """Hook of the post-MLP norm's per-position scale (None where the block has no post-norm)."""
    norm = mlp_post_norm(model, layer)
    if norm is None:
        return None
    name = getattr(norm.hook_scale, "name", None)
    return name if name is not None and has_hook(model, name) else None


def final_norm_layer(model):
    """The final norm before the unembedding (`ln_final`), or None for models without one."""
    return getattr(model, "ln_final", None)


def final_scale_name(model) -> str | None:
    """The hook holding the final norm's per-position scale, or None for models without one."""
    return "ln_final.hook_scale" if has_hook(model, "ln_final.hook_scale") else None


def token_embeddings(model, tokens: Int[Tensor, "pos"]) -> Float[Tensor, "pos d_model"]:
    """The token embeddings of `tokens`, without positions: what `hook_embed` sees."""
    return model.embed(tokens[None])[0]
