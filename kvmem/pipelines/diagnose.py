"""Where is a fact stored? One report joining layer-level and neuron-level evidence.

    loc = kvmem.diagnose(model, fact, paraphrases=["Where does X live? In the city of", ...])
    loc.peak_layer, loc.score, loc.neurons
    loc.to_frame(); loc.plot(); loc.show()

For the fact's prompt and each paraphrase the model answers (top-1 first target token), the
report runs the existing analyses unchanged and keeps what they say about each layer:

- causal tracing (`kvmem.causal_trace`, kind "mlp"): the indirect effect of restoring the MLP
  output at the LAST SUBJECT TOKEN, for one layer at a time (`trace_single`) and for ROME's window
  of layers around it (`trace_window`); one noise level for all prompts (`noise_level` over them);
- the memory view (`kvmem.fact_memories`): the summed push of every memory of the layer toward
  the answer's first token at the last subject token (`memory_subject`, a logit-lens reading) and
  at the last token (`memory_last`, the MLP's exact direct logit attribution);
- knowledge neurons (`kvmem.knowledge_neurons`, Dai et al.): integrated-gradients attribution of
  every neuron at the last prompt position; `ig_layer` is the positive attribution summed per
  layer, `neuron_sets` each prompt's neurons above `threshold` × its maximum, `neurons` the
  refined set shared by `share` of the prompts.

Summaries (all over the layers 0..L-1, averaged over the prompts used):

- `layer_share` p_l = max(IE_l, 0) / Σ_j max(IE_j, 0), IE = the single-layer MLP indirect effect
  at the last subject token (`trace_single`, mean over prompts);
- `peak_layer` = argmax p (the diagnosed edit layer; ROME edits at the causal-tracing MLP peak at
  the last subject token); `peak_share` = p at the peak; `peak_layers` the argmax of every profile;
- `entropy` = H(p) / log L (0: all effect in one layer; 1: spread evenly), `concentration` = 1 − entropy;
- `jaccard` = mean pairwise Jaccard index |A∩B| / |A∪B| of the prompts' `neuron_sets` (1.0 when only
  one prompt is used; two empty sets count as 1);
- **localization score** S = sqrt(concentration × jaccard), in [0, 1]: high only when the causal
  effect sits in one layer AND the same neurons carry the answer across wordings.

A fact the model does not know (its own prompt's top-1 token is not the target's first token) has
no location to report: `diagnose` raises `UnknownFactError` (pass `require_known=False` to trace it
anyway, e.g. on random test models). Paraphrases the model gets wrong are left out and listed in
`dropped`. If noise never lowers the answer (no positive indirect effect anywhere), p is undefined:
`peak_layer` is -1 and the score 0, with `no_effect=True`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem import config
from kvmem.core.facts import Fact
from kvmem.errors import InvalidArgumentError, UnknownFactError
from kvmem.memories.fact_view import fact_memories
from kvmem.neurons import Neuron, knowledge_neurons
from kvmem.recall import fact_recall
from kvmem.tracing import causal_trace, noise_level

PROFILES = ("trace_single", "trace_window", "memory_subject", "memory_last", "ig_layer")


def jaccard_index(a: Sequence[Neuron], b: Sequence[Neuron]) -> float:
    """|A ∩ B| / |A ∪ B| of two neuron sets (1.0 for two empty sets)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def mean_pairwise_jaccard(sets: Sequence[Sequence[Neuron]]) -> float:
    """Mean Jaccard index over all pairs of sets (1.0 for fewer than two sets)."""
    pairs = list(combinations(sets, 2))
    return 1.0 if not pairs else sum(jaccard_index(a, b) for a, b in pairs) / len(pairs)


def layer_distribution(effect: Float[Tensor, "layer"]) -> Float[Tensor, "layer"]:
    """max(effect, 0) normalised to sum 1 (all zeros when no layer has a positive effect)."""
    pos = effect.double().clamp(min=0)
    total = pos.sum()
    return pos / total if total > 0 else torch.zeros_like(pos)


def normalized_entropy(p: Float[Tensor, "layer"]) -> float:
    """H(p) / log(len(p)) in [0, 1] (1.0 for a zero vector: no localization at all)."""
    n = p.numel()
    if n < 2 or float(p.sum()) <= 0:
        return 1.0 if float(p.sum()) <= 0 else 0.0
    nz = p[p > 0].double()
    return float(-(nz * nz.log()).sum() / math.log(n))


@dataclass(frozen=True)
class Localization:
    """The diagnostic of one fact (see the module docstring for every field's definition).

    Per-prompt profiles are `[prompt, layer]` tensors over `prompts` (the fact's own prompt first).
    """

    fact: Fact
    prompts: tuple[str, ...]
    dropped: tuple[str, ...]
    window: int
    noise: float
    samples: int
    seed: int
    p_clean: Float[Tensor, "prompt"] = field(repr=False)
    p_corrupt: Float[Tensor, "prompt"] = field(repr=False)
    trace_single: Float[Tensor, "prompt layer"] = field(repr=False)
    trace_window: Float[Tensor, "prompt layer"] = field(repr=False)
    memory_subject: Float[Tensor, "prompt layer"] = field(repr=False)
    memory_last: Float[Tensor, "prompt layer"] = field(repr=False)
    ig_layer: Float[Tensor, "prompt layer"] = field(repr=False)
    neuron_sets: tuple[tuple[Neuron, ...], ...]
    neurons: tuple[Neuron, ...]
    threshold: float
    share: float
    layer_share: Float[Tensor, "layer"] = field(repr=False)
    peak_layer: int
    peak_share: float
    entropy: float
    concentration: float
    jaccard: float
    score: float
    peak_layers: dict = field(default_factory=dict)
    no_effect: bool = False
    known: bool = True
    # `kvmem.predict_interference` of the edit at the peak layer (`diagnose(..., interference_stats=)`)
    interference: object = field(default=None, repr=False)
    # how the causal-trace profiles were made: "exact", or the attribution method that estimated them
    trace_method: str = "exact"

    @property
    def n_layers(self) -> int:
        return int(self.trace_single.shape[1])

    @property
    def agreement(self) -> float:
        """Share of the five profiles whose peak layer equals `peak_layer`."""
        return sum(v == self.peak_layer for v in self.peak_layers.values()) / max(len(self.peak_layers), 1)

    def profile(self, name: str) -> Float[Tensor, "layer"]:
        """One evidence profile averaged over the prompts (`PROFILES`)."""
        if name not in PROFILES:
            raise InvalidArgumentError(f"Unknown profile {name!r}; use one of {PROFILES}.")
        return getattr(self, name).double().mean(0)

    def summary(self) -> dict:
        """The scalar results as a flat dict (one row of a table over facts)."""
        return {
            "subject": self.fact.subject, "prompt": self.fact.prompt, "target": self.fact.target_true,
            "n_prompts": len(self.prompts), "n_dropped": len(self.dropped), "peak_layer": self.peak_layer,
            "peak_share": self.peak_share, "entropy": self.entropy, "concentration": self.concentration,
            "jaccard": self.jaccard, "score": self.score, "agreement": self.agreement,
            "n_neurons": len(self.neurons), "no_effect": self.no_effect,
            "p_clean": float(self.p_clean.mean()), "p_corrupt": float(self.p_corrupt.mean()),
            **{f"peak_{k}": v for k, v in self.peak_layers.items()},
            **({} if self.interference is None else
               {"interference_risk": self.interference.risk, "interference_lam_max": self.interference.lam_max}),
            **({} if self.trace_method == "exact" else {"trace_method": self.trace_method}),
        }

    def to_frame(self):
        """Long format: one row per (prompt, layer) with every profile, plus the prompt's neuron count."""
        import pandas as pd

        rows = []
        for i, prompt in enumerate(self.prompts):
            for l in range(self.n_layers):
                rows.append({
                    "prompt": prompt, "layer": l,
                    **{name: float(getattr(self, name)[i, l]) for name in PROFILES},
                    "n_neurons_layer": sum(1 for ll, _ in self.neuron_sets[i] if ll == l),
                    "layer_share": float(self.layer_share[l]),
                })
        return pd.DataFrame(rows)

    def plot(self, ax=None, *, title: str | None = None):
        """Three panels: every profile by layer (each scaled to its maximum), the per-prompt
        single-layer indirect effects, and the pairwise Jaccard matrix of the neuron sets. `ax`:
        three axes to draw into (default: a new figure). Returns the Figure."""
        from kvmem.viz import figure_axes

        fig, axes = figure_axes(ax, 3, figsize=(14, 3.4))
        layers = list(range(self.n_layers))
        ax = axes[0]
        for name in PROFILES:
            prof = self.profile(name)
            top = float(prof.abs().max()) or 1.0
            ax.plot(layers, (prof / top).numpy(), marker="o", markersize=3, label=name)
        ax.axvline(self.peak_layer, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("layer")
        ax.set_title("evidence by layer (each / its max)", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1]
        for i, p in enumerate(self.prompts):
            ax.plot(layers, self.trace_single[i].numpy(), alpha=0.7, label=p[:40])
        ax.set_xlabel("layer")
        ax.set_title("MLP indirect effect at last subject token", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[2]
        n = len(self.neuron_sets)
        J = [[jaccard_index(self.neuron_sets[i], self.neuron_sets[j]) for j in range(n)] for i in range(n)]
        im = ax.imshow(J, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"neuron-set Jaccard (mean {self.jaccard:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.suptitle(title or f"{self.fact.prompt!r} → {self.fact.target_true!r}: peak layer {self.peak_layer}, "
                     f"score {self.score:.2f}", fontsize=10)
        fig.tight_layout()
        return fig

    def show(self):
        """Offline-safe HTML: summary, a heat table of every profile by layer, the neurons."""
        from kvmem.viz import HTMLView

        def cell(v: float, top: float) -> str:
            a = 0 if top <= 0 else max(-1.0, min(1.0, v / top))
            color = f"rgba(33,113,181,{a:.2f})" if a >= 0 else f"rgba(203,24,29,{-a:.2f})"
            return f'<td style="background:{color};padding:2px 6px;text-align:right">{v:.3g}</td>'

        head = "".join(f"<th>L{l}</th>" for l in range(self.n_layers))
        rows = []
        for name in PROFILES:
            prof = self.profile(name)
            top = float(prof.abs().max())
            rows.append(f"<tr><td>{name}</td>" + "".join(cell(float(v), top) for v in prof) + "</tr>")
        rows.append("<tr><td>layer_share</td>" + "".join(cell(float(v), 1.0) for v in self.layer_share) + "</tr>")
        neurons = ", ".join(f"L{l}.{n}" for l, n in self.neurons) or "none"
        prompts = "".join(f"<li>{html.escape(p)}</li>" for p in self.prompts)
        dropped = "".join(f"<li><s>{html.escape(p)}</s> (not answered)</li>" for p in self.dropped)
        src = (
            '<div style="font-family:sans-serif;font-size:13px">'
            f"<b>{html.escape(self.fact.prompt)}</b> → <b>{html.escape(str(self.fact.target_true))}</b><br>"
            f"peak layer <b>{self.peak_layer}</b> (share {self.peak_share:.2f}), entropy {self.entropy:.2f}, "
            f"neuron-set Jaccard {self.jaccard:.2f}, <b>localization score {self.score:.2f}</b>, "
            f"evidence agreement {self.agreement:.0%}<br>"
            + ("" if self.interference is None else
               f"predicted interference of an edit at layer {self.peak_layer}: risk <b>{self.interference.risk:.2f}</b>, "
               f"max |λ| {self.interference.lam_max:.3f}<br>") +
            f'<table style="border-collapse:collapse;margin:6px 0"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
            f"knowledge neurons: {html.escape(neurons)}<br>prompts:<ul>{prompts}{dropped}</ul></div>"
        )
        return HTMLView(src)


def _as_fact(fact: Fact, p: str | Fact) -> Fact:
    if isinstance(p, Fact):
        if p.target_true is not None and fact.target_true is not None and p.target_true.strip() != fact.target_true.strip():
            raise InvalidArgumentError(
                f"Paraphrase {p.prompt!r} has target {p.target_true!r}, the fact {fact.target_true!r}; "
                "paraphrases must ask for the same answer."
            )
        return Fact(p.prompt, p.subject, target_true=fact.target_true, relation_id=fact.relation_id)
    if not isinstance(p, str):
        raise InvalidArgumentError(f"A paraphrase must be a prompt string or a Fact, got {type(p).__name__}.")
    return Fact(p, fact.subject, target_true=fact.target_true, relation_id=fact.relation_id)


def diagnose(
    model,
    fact: Fact,
    paraphrases: Sequence[str | Fact] = (),
    *,
    window: int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    steps: int = 20,
    threshold: float = 0.2,
    share: float = 0.7,
    memory_k: int = 10,
    require_known: bool = True,
    interference_stats=None,
    neighbourhood: Sequence[str] = (),
    progress: bool | None = None,
    trace_method: str = "exact",
) -> Localization:
    """Localize one fact from causal tracing, the memory view and knowledge neurons (module docstring).

    `fact` needs `target_true`. `paraphrases`: other prompts for the same fact (strings containing
    `fact.subject`, or Facts with the same target). `window`: ROME's MLP window (default
    `kvmem.config.localization_window(n_layers)`, 10 of 48 layers scaled). `noise`: default
    `noise_level` over all prompts. `samples`, `seed`: causal-tracing noise samples. `steps`,
    `threshold`, `share`: integrated gradients and Dai et al.'s refinement. `memory_k`: memories
    kept per layer by the memory view (the layer totals use all of them). `progress`: a bar over
    the knowledge-neuron prompts, the slow step (None: `kvmem.config.PROGRESS`). Raises
    `UnknownFactError` for a fact the model does not answer (unless `require_known=False`).
    `interference_stats`: key statistics for the peak layer (a `SecondMoment`, or a callable layer →
    statistics); with them and `fact.target_new`, `interference` holds `kvmem.predict_interference`
    of the ROME edit at the peak layer, checked on `neighbourhood` prompts if given, else on kvmem's
    built-in facts the model answers.
    `trace_method`: "exact" (causal tracing), or an attribution method of
    `kvmem.tracing.attribution` ("atp", ...) estimating the traced column from gradients, a cheap
    pre-screen (docs/attribution.md says how far its peaks agree with the exact ones).
    """
    if not isinstance(fact, Fact):
        raise InvalidArgumentError(f"Expected a kvmem.Fact, got {type(fact).__name__}.")
    fact.target("true")  # EmptyTargetError when missing
    if trace_method != "exact":  # checked before any work
        from kvmem.tracing.attribution import METHODS

        if trace_method not in METHODS:
            raise InvalidArgumentError(f"Unknown attribution method {trace_method!r} for trace_method; use 'exact' "
                                       f"or one of {', '.join(METHODS)}.")
    if isinstance(paraphrases, (str, Fact)):
        paraphrases = [paraphrases]
    candidates = [fact] + [_as_fact(fact, p) for p in paraphrases]
    if len({f.prompt for f in candidates}) != len(candidates):
        raise InvalidArgumentError("The paraphrases repeat a prompt (or the fact's own prompt); pass each once.")
    n_layers = int(model.cfg.n_layers)
    window = config.localization_window(n_layers) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layers:
        raise InvalidArgumentError(f"window must be an int in [1, {n_layers}], got {window!r}.")

    known = fact_recall(model, candidates, progress=False).known.tolist()
    if not known[0] and require_known:
        raise UnknownFactError(
            f"The model does not answer {fact.target_true!r} to {fact.prompt!r} (not its top-1 token), so there "
            "is no recall to localize. Diagnose facts the model knows (kvmem.fact_recall), or pass "
            "require_known=False to trace it anyway."
        )
    use = [f for f, k in zip(candidates, known) if k or not require_known]
    dropped = tuple(f.prompt for f in candidates if f not in use)
    if noise is None:
        noise = noise_level(model, use)

    p_clean, p_corrupt, single, windowed, mem_s, mem_l = [], [], [], [], [], []
    for f in use:
        for w, out in ((1, single), (window, windowed)):
            if trace_method == "exact":
                tr = causal_trace(model, f, kind="mlp", window=w, noise=noise, samples=samples, seed=seed,
                                  positions="subject_last", progress=False)  # only that column is read
            else:
                from kvmem.tracing.attribution import attribution_trace

                tr = attribution_trace(model, f, kind="mlp", window=w, noise=noise, samples=samples, seed=seed,
                                       positions="subject_last", method=trace_method)
            out.append(tr.indirect_effect[:, tr.subject.last].double())
        p_clean.append(tr.p_clean)
        p_corrupt.append(tr.p_corrupt)
        fm = fact_memories(model, f, k=memory_k)
        mem_s.append(fm.total[:, 0].double())
        mem_l.append(fm.total[:, 1].double())
    kn = knowledge_neurons(model, use, threshold=threshold, share=share, steps=steps, progress=progress)
    ig = torch.stack([a.scores.double().clamp(min=0).sum(-1) for a in kn.attributions])
    sets = tuple(tuple(a.neurons_above(threshold)) for a in kn.attributions)

    trace_single = torch.stack(single)
    p = layer_distribution(trace_single.mean(0))
    no_effect = float(p.sum()) == 0.0
    entropy = normalized_entropy(p)
    jac = mean_pairwise_jaccard(sets)
    concentration = 1.0 - entropy
    profiles = {"trace_single": trace_single, "trace_window": torch.stack(windowed),
                "memory_subject": torch.stack(mem_s), "memory_last": torch.stack(mem_l), "ig_layer": ig}
    peak_layers = {k: int(v.mean(0).argmax()) for k, v in profiles.items()}
    peak = -1 if no_effect else int(p.argmax())
    interference = None
    if interference_stats is not None and fact.target_new and peak >= 0:
        from kvmem.editing.interference import predict_interference

        st = interference_stats(peak) if callable(interference_stats) else interference_stats
        interference = predict_interference(model, fact, peak, stats=st, require_known=False,
                                            banks=("neighbourhood",) if neighbourhood else ("known",),
                                            neighbourhood=list(neighbourhood) or None)
    return Localization(
        fact=fact, prompts=tuple(f.prompt for f in use), dropped=dropped, window=window, noise=float(noise),
        samples=samples, seed=seed,
        p_clean=torch.tensor(p_clean, dtype=torch.float64), p_corrupt=torch.tensor(p_corrupt, dtype=torch.float64),
        **profiles, neuron_sets=sets, neurons=tuple(kn.neurons), threshold=threshold, share=kn.share,
        layer_share=p, peak_layer=peak, peak_share=0.0 if no_effect else float(p[peak]), entropy=entropy,
        concentration=concentration, jaccard=jac, score=0.0 if no_effect else math.sqrt(max(concentration, 0.0) * jac),
        peak_layers=peak_layers, no_effect=no_effect, known=bool(known[0]), interference=interference,
        trace_method=trace_method,
    )


__all__ = ["diagnose", "Localization", "jaccard_index",
           "mean_pairwise_jaccard", "layer_distribution", "normalized_entropy", "PROFILES"]
