"""Knowledge neurons over a set of facts: one record per fact (its neurons and what scaling them
does), and the survey of those records (tables and a figure). `kvmem neurons` logs one record per
fact and resumes from the log; Python callers can do the same with `kvmem.runs.RunLog`.

    rows = [fact_neurons(model, record) for record in records]
    survey = NeuronSurvey(tuple(rows), model.cfg.n_layers)
    survey.to_frame(); survey.neuron_frame(); survey.plot()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from kvmem.data import CounterFactRecord
from kvmem.neurons import knowledge_neurons, neuron_effect

# Dai et al.'s two interventions: erase (×0) and double (×2) the knowledge neurons' activation.
FACTORS = (("suppress", 0.0), ("amplify", 2.0))


def fact_neurons(
    model,
    record: CounterFactRecord,
    *,
    threshold: float = 0.2,
    share: float = 0.7,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    controls: int = 1,
    seed: int = 0,
) -> dict:
    """The knowledge neurons of one fact, shared across its prompt and paraphrases
    (`knowledge_neurons`), and the relative change of p(target) when they are suppressed or
    amplified, beside `controls` draws of random neurons (`neuron_effect`). A JSON-ready dict:
    prompt, subject, target, n_prompts, share (the share used), neurons [[layer, neuron], ...],
    n_neurons, prob (p(target) per prompt), and per intervention ("suppress", "amplify") its
    relative change, the controls' and the mean p(target) before and after (None without neurons).
    """
    fact = record.request
    prompts = list(dict.fromkeys([fact.prompt, *record.paraphrase_prompts]))
    kn = knowledge_neurons(model, prompts, fact.target_true, threshold=threshold, share=share, layers=layers,
                           steps=steps, progress=False)
    out: dict = {
        "prompt": fact.prompt, "subject": fact.subject, "target": fact.target_true, "n_prompts": len(prompts),
        "share": kn.share, "neurons": [list(n) for n in kn.neurons], "n_neurons": len(kn),
        "prob": [a.prob for a in kn.attributions],
    }
    for name, factor in FACTORS:
        if not kn.neurons:
            out[name] = None
            continue
        eff = neuron_effect(model, prompts, fact.target_true, neurons=kn, factor=factor, n_controls=controls,
                            seed=seed)
        out[name] = {"relative_change": eff.relative_change, "control_relative_change": eff.control_relative_change,
                     "p_before": eff.p_before.mean().item(), "p_after": eff.p_after.mean().item()}
    return out


def _mean(values: list) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class NeuronSurvey:
    """`fact_neurons` records of several facts (each may carry "record" and "case_id", where it
    came from) on a model with `n_layers` layers."""

    records: tuple[dict, ...]
    n_layers: int

    def to_frame(self):
        """One row per fact: its neuron count and the suppress / amplify effects beside the controls'."""
        import pandas as pd

        def effect(r: dict, name: str, key: str):
            return (r.get(name) or {}).get(key)

        return pd.DataFrame([{
            "record": r.get("record"), "case_id": r.get("case_id"), "prompt": r["prompt"], "target": r["target"],
            "n_prompts": r["n_prompts"], "n_neurons": r["n_neurons"], "share": r["share"],
            "suppress": effect(r, "suppress", "relative_change"),
            "suppress_control": effect(r, "suppress", "control_relative_change"),
            "amplify": effect(r, "amplify", "relative_change"),
            "amplify_control": effect(r, "amplify", "control_relative_change"),
        } for r in self.records])

    def neuron_frame(self):
        """One row per (fact, knowledge neuron): record, layer, neuron."""
        import pandas as pd

        return pd.DataFrame([{"record": r.get("record"), "layer": l, "neuron": n}
                             for r in self.records for l, n in r["neurons"]], columns=["record", "layer", "neuron"])

    @property
    def mean_neurons(self) -> float:
        return _mean([r["n_neurons"] for r in self.records])

    def mean_effect(self, name: str, *, control: bool = False) -> float:
        """Mean relative change of p(target) over the facts with neurons ("suppress" or "amplify")."""
        key = "control_relative_change" if control else "relative_change"
        return _mean([r[name][key] for r in self.records if r.get(name)])

    def plot(self, ax=None, *, title: str | None = None):
        """Two panels: knowledge neurons per layer over all facts, and the mean relative change of
        p(target) when they are suppressed / amplified beside random neurons. Returns the Figure."""
        import numpy as np

        from kvmem.viz import figure_axes

        fig, (a, b) = figure_axes(ax, 2, figsize=(10, 3.4))
        counts = np.zeros(self.n_layers)
        for r in self.records:
            for layer, _ in r["neurons"]:
                counts[layer] += 1
        a.bar(range(self.n_layers), counts)
        a.set_xlabel("layer")
        a.set_ylabel("knowledge neurons (all facts)")
        a.set_title(title or f"{len(self.records)} facts")
        names = [name for name, _ in FACTORS if any(r.get(name) for r in self.records)]
        x = np.arange(len(names))
        b.bar(x - 0.2, [100 * self.mean_effect(n) for n in names], 0.4, label="knowledge neurons", color="C3")
        b.bar(x + 0.2, [100 * self.mean_effect(n, control=True) for n in names], 0.4, label="random neurons",
              color="C7")
        b.set_xticks(x, names)
        b.axhline(0, color="k", lw=0.8)
        b.set_ylabel("mean relative change of p(target), %")
        b.legend(fontsize=8)
        fig.tight_layout()
        return fig


__all__ = ["fact_neurons", "NeuronSurvey", "FACTORS"]
