"""ROME's key statistics over several layers: one record per layer's `SecondMoment` (its size,
conditioning, cache file and convergence), and the survey of those records (a table and the
convergence figure). `kvmem stats` logs one record per layer and resumes from the log.

    survey = MomentSurvey(tuple(moment_record(second_moment(model, l, corpus)) for l in layers))
    survey.to_frame(); survey.plot()
"""

from __future__ import annotations

from dataclasses import dataclass

# The convergence curve: a list per record, kept out of the flat table.
CURVES = ("tokens_seen", "rel_change")


def moment_record(sm) -> dict:
    """A `SecondMoment` as a JSON-ready dict: layer, n_tokens, condition_number, eigmin, eigmax,
    corpus_fingerprint, cache_file, the convergence curve (`tokens_seen`, `rel_change`: relative
    change of C between checkpoints) and the seconds it took."""
    return {
        "layer": sm.layer, "n_tokens": sm.n_tokens, "condition_number": sm.condition_number,
        "eigmin": sm.eigmin, "eigmax": sm.eigmax, "corpus_fingerprint": sm.corpus_fingerprint,
        "cache_file": sm.path, "tokens_seen": sm.tokens_seen.tolist(), "rel_change": sm.rel_change.tolist(),
        "seconds": round(sm.seconds, 3),
    }


@dataclass(frozen=True)
class MomentSurvey:
    """`moment_record`s of several layers, computed over the corpus named `corpus`."""

    records: tuple[dict, ...]
    corpus: str = ""

    def to_frame(self):
        """One row per layer (the convergence curves left out)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items() if k not in CURVES} for r in self.records])

    def plot(self, ax=None, *, title: str | None = None):
        """Relative change of C against tokens seen, one curve per layer (log-log). Returns the Figure."""
        from kvmem.viz import figure_axes

        fig, (ax,) = figure_axes(ax, 1, figsize=(5.5, 3.4))
        for r in self.records:
            if r["rel_change"]:
                ax.loglog(r["tokens_seen"], r["rel_change"], "o-", label=f"layer {r['layer']}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("relative change of C")
        ax.set_title(title or f"Convergence of C over {self.corpus}"[:80], fontsize=9)
        if self.records:
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


__all__ = ["moment_record", "MomentSurvey"]
