"""What causal tracing returns: one trace (`CausalTrace`), the traces of several kinds for one fact
(`TraceSet`), and ROME's average over facts (`AverageEffect`). Each converts to a pandas frame,
plots (`plot(ax=None, *, title=None)` -> Figure) and, for traces, shows an offline HTML view."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

from kvmem.core.facts import Fact, SubjectSpan
from kvmem.errors import InvalidArgumentError
from kvmem.tracing import plots
from kvmem.viz import HTMLView


@dataclass(frozen=True)
class CausalTrace:
    """One fact, one kind of state: `scores[l, t]` = answer probability with (l, t) restored."""

    kind: str
    scores: Float[Tensor, "layer pos"] = field(repr=False)
    p_clean: float
    p_corrupt: float
    str_tokens: tuple[str, ...]
    subject: SubjectSpan
    answer: str
    answer_id: int
    correct: bool | None
    window: int
    noise: float
    samples: int
    seed: int
    sever: str | None = None
    fact: Fact | None = field(default=None, compare=False)
    # "exact" (causal_trace), else the attribution method and steps that estimated the scores
    # (kvmem.tracing.attribution: "atp", "atp*", "ig(k=16)", ...)
    method: str = "exact"

    @property
    def indirect_effect(self) -> Float[Tensor, "layer pos"]:
        """`scores - p_corrupt`: the probability each restoration brings back."""
        return self.scores - self.p_corrupt

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    def to_frame(self):
        """Long format: one row per (layer, position)."""
        import pandas as pd

        n_layers, n_pos = self.scores.shape
        ie = self.indirect_effect
        records = [
            {
                "kind": self.kind,
                "sever": self.sever,
                "layer": layer,
                "position": pos,
                "token": self.str_tokens[pos],
                "is_subject": self.subject.start <= pos < self.subject.end,
                "score": float(self.scores[layer, pos]),
                "indirect_effect": float(ie[layer, pos]),
                "p_clean": self.p_clean,
                "p_corrupt": self.p_corrupt,
            }
            for layer in range(n_layers)
            for pos in range(n_pos)
        ]
        return pd.DataFrame.from_records(records)

    def plot(self, ax=None, *, title: str | None = None):
        """ROME-style heatmap: tokens down (subject marked '*'), layers across."""
        return plots.plot_trace(self, ax=ax, title=title)

    def show(self) -> HTMLView:
        """Interactive circuitsvis view (inline JavaScript, works offline)."""
        return plots.show_traces([self])


@dataclass(frozen=True)
class TraceSet:
    """The traces of several kinds for one fact, computed from shared clean and corrupted runs."""

    traces: tuple[CausalTrace, ...]

    def __getitem__(self, kind: str) -> CausalTrace:
        for t in self.traces:
            if t.kind == kind:
                return t
        raise InvalidArgumentError(f"No {kind!r} trace here; kinds: {[t.kind for t in self.traces]}.")

    def __iter__(self):
        return iter(self.traces)

    def __len__(self) -> int:
        return len(self.traces)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(t.kind for t in self.traces)

    @property
    def p_clean(self) -> float:
        return self.traces[0].p_clean

    @property
    def p_corrupt(self) -> float:
        return self.traces[0].p_corrupt

    def to_frame(self):
        import pandas as pd

        return pd.concat([t.to_frame() for t in self.traces], ignore_index=True)

    def plot(self, ax=None, *, title: str | None = None):
        """Side-by-side heatmaps, one per kind (ROME fig. 1); `ax`: one Axes per kind."""
        return plots.plot_traces(self.traces, ax=ax, title=title)

    def show(self) -> HTMLView:
        return plots.show_traces(self.traces)


@dataclass(frozen=True)
class AverageEffect:
    """Average indirect effects over facts, per kind x token bucket x layer (ROME fig. 2).
    `counts[b]`: how many facts have bucket b (and so enter its average)."""

    kinds: tuple[str, ...]
    buckets: tuple[str, ...]
    aie: Float[Tensor, "kind bucket layer"] = field(repr=False)
    mean_score: Float[Tensor, "kind bucket layer"] = field(repr=False)
    counts: Int[Tensor, "bucket"] = field(repr=False)
    n_facts: int
    n_skipped: int
    p_clean: float
    p_corrupt: float
    noise: float
    window: int
    samples: int
    # "exact", else the attribution method that estimated every fact's grids (`CausalTrace.method`)
    method: str = "exact"

    def __getitem__(self, kind: str) -> Float[Tensor, "bucket layer"]:
        if kind not in self.kinds:
            raise InvalidArgumentError(f"No {kind!r} here; kinds: {list(self.kinds)}.")
        return self.aie[self.kinds.index(kind)]

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def to_frame(self):
        import pandas as pd

        records = [
            {
                "kind": kind,
                "bucket": bucket,
                "layer": layer,
                "aie": float(self.aie[k, b, layer]),
                "mean_score": float(self.mean_score[k, b, layer]),
                "count": int(self.counts[b]),
            }
            for k, kind in enumerate(self.kinds)
            for b, bucket in enumerate(self.buckets)
            for layer in range(self.aie.shape[-1])
        ]
        return pd.DataFrame.from_records(records)

    def plot(self, ax=None, *, title: str | None = None):
        """AIE by layer, one panel per kind (`ax`: one Axes per kind), one curve per token bucket."""
        return plots.plot_average_effect(self, ax=ax, title=title)


__all__ = ["CausalTrace", "TraceSet", "AverageEffect"]
