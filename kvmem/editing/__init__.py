"""Editing facts in MLP weights: ROME (rank-one), its key statistics, and applying edits.

    stats = second_moment(model, layer, "wiki", n_tokens=200_000)      # cached on disk
    edit = compute_rome_edit(model, Fact(...target_new="Rome"), stats=stats)
    with edited(model, edit):                                          # restored on exit
        ...
"""

from kvmem.editing.apply import apply_edit, edited
from kvmem.editing.layer import choose_edit_layer, tracing_peak_layer
from kvmem.core.fingerprint import model_fingerprint
from kvmem.editing.rome import (
    PRESETS,
    Edit,
    RomeHparams,
    compute_rome_edit,
    context_prefixes,
    edit_layer,
    reinsert,
    rome_hparams,
    rome_statistics,
)
from kvmem.editing.stats import SecondMoment, load_second_moment, second_moment
from kvmem.editing.memit import (
    MEMIT_PRESETS,
    MemitHparams,
    compute_memit_edit,
    memit_hparams,
    memit_statistics,
    solve_update,
)
from kvmem.editing.multi_edit import MultiLayerEdit, load_edit
from kvmem.editing.nullspace import NullSpace, null_space
from kvmem.editing.session import EditSession, SessionStep
from kvmem.errors import ModelMismatchError, SingularStatisticsError

__all__ = [
    "Edit", "RomeHparams", "PRESETS", "rome_hparams", "edit_layer", "compute_rome_edit",
    "context_prefixes", "rome_statistics", "apply_edit", "edited", "SecondMoment", "second_moment",
    "load_second_moment", "SingularStatisticsError", "ModelMismatchError", "model_fingerprint",
    "choose_edit_layer", "tracing_peak_layer", "reinsert",
    "MemitHparams", "MEMIT_PRESETS", "memit_hparams", "compute_memit_edit", "memit_statistics",
    "solve_update", "MultiLayerEdit", "load_edit", "NullSpace", "null_space", "EditSession", "SessionStep",
]
