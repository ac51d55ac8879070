"""Which MLP to edit: ROME's rule, the layer where restoring the MLP output at the subject's last
token brings back the most of the answer (the peak of the MLP average indirect effect, fig. 2)."""

from __future__ import annotations

from typing import Sequence

from kvmem import config
from kvmem.core.facts import Fact
from kvmem.errors import InvalidArgumentError


def tracing_peak_layer(effect, *, kind: str = "mlp", bucket: str = "last subject token") -> int:
    """The layer of the largest average indirect effect of `kind` at `bucket` in an
    `AverageEffect` (from `kvmem.average_indirect_effect`). With a window w > 1 the effect at
    layer l restores layers [l - w//2, l + w - w//2), so the peak is the centre of the best window,
    as in ROME (GPT-2 XL: window 10, peak and edit layer 17 of 48)."""
    if effect.n_facts == 0:
        raise InvalidArgumentError("The average effect covers no facts; trace facts the model knows.")
    if bucket not in effect.buckets:
        raise InvalidArgumentError(f"Unknown bucket {bucket!r}; one of {list(effect.buckets)}.")
    row = effect[kind][effect.buckets.index(bucket)]
    return int(row.argmax())


def choose_edit_layer(
    model,
    facts: Sequence[Fact],
    *,
    window: int | None = None,
    samples: int = 10,
    seed: int = 0,
    progress: bool | None = None,
) -> int:
    """Trace `facts` (MLP restorations only) and return `tracing_peak_layer` of the result.
    `window` defaults to `kvmem.config.trace_window` (ROME's 10, or half the model on models
    with fewer than 10 layers). `progress`: None means `kvmem.config.PROGRESS`."""
    from kvmem.tracing import average_indirect_effect

    if window is None:
        window = config.trace_window(model.cfg.n_layers)
    effect = average_indirect_effect(
        model, facts, kinds=("mlp",), window=window, samples=samples, seed=seed, progress=progress
    )
    return tracing_peak_layer(effect)


__all__ = ["tracing_peak_layer", "choose_edit_layer"]
