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
from kvmem.editing.multi_edit import MultiLayerEdit
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


def _check_shapes(model, edit: Edit | MultiLayerEdit) -> None:
    if not isinstance(edit, (Edit, MultiLayerEdit)):
        raise InvalidArgumentError(f"Expected a kvmem Edit or MultiLayerEdit, got {type(edit).__name__}.")
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    if isinstance(edit, Edit):
        check_layer(model, edit.layer)
        parts = [(edit.u, (d_mlp,)), (edit.lam, (d_model,))]
    else:
        parts = []
        for l, U, V in zip(edit.layers, edit.U, edit.V):
            check_layer(model, l)
            parts += [(U, (d_mlp, U.shape[-1])), (V, (U.shape[-1], d_model))]
    for t, want in parts:
        if tuple(t.shape) != want:
            raise ModelMismatchError(
                f"The edit holds a tensor of shape {tuple(t.shape)} where this model (d_mlp={d_mlp}, "
                f"d_model={d_model}) needs {want}: it was made for another model."
            )
        if not torch.isfinite(t).all():
            raise InvalidArgumentError("The edit holds NaN or inf values; recompute it.")


def _check_model(model, edit: Edit | MultiLayerEdit) -> str:
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
        f"This {edit.describe} was computed on other weights than this model's: "
        f"{why}. Recompute it on this model with compute_rome_edit, or apply it to the model it was made for."
    )


def apply_edit(model, edit: Edit | MultiLayerEdit, *, check: bool = True):
    """MUTATES `model`: adds the edit's update to `W_out` of each layer it edits, in place (ROME:
    rank one at `edit.layer`; MEMIT/AlphaEdit: `U_l V_l` at each of `edit.layers`).

    Returns the model. Undo by keeping a copy, or use `with edited(model, edit):` instead, which
    restores the weights exactly. `check=False` skips the fingerprint check (shapes are always checked).
    """
    _check_shapes(model, edit)
    before = _check_model(model, edit) if check else None
    with torch.no_grad():
        for layer, d in edit.deltas(torch.float64):
            W = mlp_weights(model, layer).W_out
            W.add_(d.to(W.device).to(W.dtype))
    _stack(model).append((before or edit.model_fingerprint, model_fingerprint(model) if check else None))
    return model


@contextmanager
def edited(model, *edits: Edit | MultiLayerEdit, check: bool = True) -> Iterator:
    """Temporarily apply `edits` (in order); on exit, also on an exception, every changed `W_out`
    is restored bit-exactly from a copy taken on entry.

        with edited(model, edit):
            model("The Eiffel Tower is located in")
    """
    for e in edits:
        _check_shapes(model, e)
    layers = sorted({l % model.cfg.n_layers for e in edits for l in e.layers})
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
