"""Putting edits into a model: `apply_edit` (mutates) and `with edited(model, *edits):` (restores).

Before an edit goes in, the model's fingerprint must equal the one the edit was computed on,
or the model must be that model plus edits applied through kvmem since (so several independent
edits computed on the same model can be stacked, and so can sequential ones).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from kvmem.core.fingerprint import model_fingerprint, same_weights
from kvmem.editing.rome import Edit
from kvmem.errors import InvalidArgumentError, ModelMismatchError
from kvmem.core.weights import check_layer, mlp_weights

# On the model object: [(fingerprint before, fingerprint after)] of each edit applied by kvmem.
_STACK_ATTR = "_kvmem_edit_stack"


def _stack(model) -> list[tuple[str, str | None]]:
    stack = getattr(model, _STACK_ATTR, None)
    if stack is None:
        stack = []
        # nn.Module.__setattr__ stores a plain list as an ordinary attribute
        setattr(model, _STACK_ATTR, stack)
    return stack


def _check_shapes(model, edit: Edit) -> None:
    if not isinstance(edit, Edit):
        raise InvalidArgumentError(f"Expected a kvmem Edit, got {type(edit).__name__}.")
    check_layer(model, edit.layer)
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    if tuple(edit.u.shape) != (d_mlp,) or tuple(edit.lam.shape) != (d_model,):
        raise ModelMismatchError(
            f"The edit has shapes u {tuple(edit.u.shape)}, Λ {tuple(edit.lam.shape)} but this model has "
            f"d_mlp={d_mlp}, d_model={d_model}: it was made for another model."
        )
    if not (torch.isfinite(edit.u).all() and torch.isfinite(edit.lam).all()):
        raise InvalidArgumentError("The edit holds NaN or inf values; recompute it.")


def _check_model(model, edit: Edit) -> str:
    now = model_fingerprint(model)
    if edit.model_fingerprint == now:
        return now
    stack = _stack(model)
    if stack and stack[-1][1] == now and edit.model_fingerprint in {before for before, _ in stack}:
        return now
    same, why = same_weights(model, edit.model_fingerprint, edit.weights_fingerprint, made_on=edit.backend)
    if same:  # the same weights on the other TransformerLens backend
        return now
    raise ModelMismatchError(
        f"This edit (subject {edit.request.subject!r}) was computed on other weights than this model's: "
        f"{why}. Recompute it on this model with compute_rome_edit, or apply it to the model it was made for."
    )


def apply_edit(model, edit: Edit, *, check: bool = True):
    """MUTATES `model`: adds the edit's rank-one update to `blocks[edit.layer].mlp.W_out` in place.

    Returns the model. Undo by keeping a copy, or use `with edited(model, edit):` instead, which
    restores the weights exactly. `check=False` skips the fingerprint check (shapes are always checked).
    """
    _check_shapes(model, edit)
    before = _check_model(model, edit) if check else None
    W = mlp_weights(model, edit.layer).W_out
    with torch.no_grad():
        W.add_(edit.delta(torch.float64).to(W.device).to(W.dtype))
    _stack(model).append((before or edit.model_fingerprint, model_fingerprint(model) if check else None))
    return model


@contextmanager
def edited(model, *edits: Edit, check: bool = True) -> Iterator:
    """Temporarily apply `edits` (in order); on exit, also on an exception, every changed `W_out`
    is restored bit-exactly from a copy taken on entry.

        with edited(model, edit):
            model("The Eiffel Tower is located in")
    """
    for e in edits:
        _check_shapes(model, e)
    layers = sorted({e.layer % model.cfg.n_layers for e in edits})
    saved = {l: mlp_weights(model, l).W_out.detach().clone() for l in layers}
    stack = _stack(model)
    depth = len(stack)
    try:
        for e in edits:
            apply_edit(model, e, check=check)
        yield model
    finally:
        with torch.no_grad():
            for l, W0 in saved.items():
                mlp_weights(model, l).W_out.copy_(W0)
        del stack[depth:]
