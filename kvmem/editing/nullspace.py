"""AlphaEdit's null space (Fang et al., ICLR 2025): the directions of an MLP's key space that the
keys of ordinary text (almost) never take, from kvmem's cached second moment C = E[k kᵀ].

    ns = null_space(C, threshold=2e-2)          # P = U₀U₀ᵀ over eigenvectors with eigenvalue < 2e-2
    ns.P @ k        # ≈ 0 for k in the span the statistics cover; = k for k in the null space

An update ΔW_out with ΔW_out = P ΔW_out (its rows in range P) changes the layer's output for a key k
by kᵀΔW_out = (Pk)ᵀΔW_out, so for any key with ‖Pk‖ ≈ 0 the output is unchanged: |kᵀΔW| ≤ ‖Pk‖·‖ΔW‖₂.

What is thresholded (AlphaEdit's code, `experiments/evaluate.py:get_project`): the singular values
of the covariance statistic as `layer_stats` returns it (`mom2.moment()`, the uncentred mean of
k kᵀ over the sampled tokens, i.e. kvmem's C), against an ABSOLUTE threshold `nullspace_threshold`
= 2e-2 (hparams for GPT-J and Llama3-8B). C is symmetric positive semi-definite, so its singular
values are its eigenvalues and `eigh` gives the same U. Being absolute, the threshold's meaning
depends on the scale of a model's keys; `relative=True` thresholds eigenvalue / largest eigenvalue
instead (recorded in the result either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.editing.stats import SecondMoment
from kvmem.errors import InvalidArgumentError

ALPHAEDIT_THRESHOLD = 2e-2


@dataclass(frozen=True)
class NullSpace:
    """P = U₀U₀ᵀ, the orthogonal projection onto the eigenvectors of C with eigenvalue below the
    threshold (`rank` of them out of `d_mlp`). `eigenvalues`: all of C's, ascending."""

    P: Float[Tensor, "d_mlp d_mlp"] = field(repr=False)
    rank: int
    d_mlp: int
    threshold: float
    relative: bool
    layer: int | None = None
    eigenvalues: Float[Tensor, "d_mlp"] = field(default=None, repr=False)

    def leak(self, keys: Float[Tensor, "n d_mlp"]) -> Float[Tensor, "n"]:
        """‖P k‖ / ‖k‖ per key: the share of each key an update confined to the null space can see."""
        k = keys.double().to(self.P.device)
        return (k @ self.P).norm(dim=-1) / k.norm(dim=-1).clamp_min(1e-300)


def null_space(C: SecondMoment | Float[Tensor, "d_mlp d_mlp"], *, threshold: float = ALPHAEDIT_THRESHOLD,
               relative: bool = False) -> NullSpace:
    """The projection onto C's null space as AlphaEdit defines it (module docstring)."""
    layer = None
    if isinstance(C, SecondMoment):
        layer, C = C.layer, C.C
    if not isinstance(C, Tensor) or C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InvalidArgumentError("null_space needs C as a square [d_mlp, d_mlp] tensor or a SecondMoment.")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise InvalidArgumentError(f"threshold must be a positive number, got {threshold!r}.")
    if not torch.isfinite(C).all():
        raise InvalidArgumentError("C holds NaN or inf values; recompute the statistics.")
    C = C.double()
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    cut = threshold * float(evals[-1]) if relative else threshold
    keep = evals < cut
    U0 = evecs[:, keep]
    return NullSpace(P=U0 @ U0.T, rank=int(keep.sum()), d_mlp=int(C.shape[0]), threshold=float(threshold),
                     relative=bool(relative), layer=layer, eigenvalues=evals)


__all__ = ["NullSpace", "null_space", "ALPHAEDIT_THRESHOLD"]
