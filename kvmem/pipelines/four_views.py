"""One fact, four views: where it is recalled (causal tracing), which neurons carry it
(knowledge neurons), which memories push its answer (the key-value memory view), and rewriting it
(a ROME edit with its CounterFact metrics). What `kvmem demo` runs; `kvmem.viz.report.fact_report`
renders the result as an offline HTML page.

    report = four_views(model, fact, paraphrases=[...], neighbours=[...], corpus="wiki")
    report.summary(); report.lines(); report.to_frame(); report.plot()
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kvmem.core.facts import Fact
from kvmem.core.tokenize import encode
from kvmem.data import CounterFactRecord
from kvmem.editing import compute_rome_edit, edited, second_moment
from kvmem.editing.rome import Edit, RomeHparams
from kvmem.errors import InvalidArgumentError, KvmemWarning
from kvmem.evaluation import CounterFactEval, evaluate_counterfact
from kvmem.memories import fact_memories
from kvmem.memories.fact_view import FactMemories
from kvmem.neurons import KnowledgeNeurons, NeuronEffect, knowledge_neurons, neuron_effect
from kvmem.pipelines.neuron_survey import FACTORS
from kvmem.editing.samples import model_samples
from kvmem.pipelines.rome_settings import SAMPLES, default_corpus, is_factworld, rome_settings, stats_tokens
from kvmem.tracing import KINDS, TraceSet, kind_windows, trace_all
from kvmem.tracing.checks import check_target

# The views that score only a target's first token (knowledge neurons and ROME use all of it).
FIRST_TOKEN_VIEWS = "causal tracing and the memory view"

# How many paraphrase and neighbour prompts the before/after answer table shows.
N_ANSWERS = 3


def trace_peak(trace) -> tuple[int, int, float]:
    """(layer, position, indirect effect) of a `CausalTrace`'s largest indirect effect (cells not
    traced, NaN, are passed over)."""
    ie = trace.indirect_effect.nan_to_num(nan=float("-inf"))
    layer, pos = divmod(int(ie.argmax()), int(ie.shape[1]))
    return layer, pos, float(ie.max())


def peak_remark(trace) -> str | None:
    """A sentence when an MLP causal trace peaks elsewhere than at the last subject token, where
    ROME (Meng et al. 2022) finds the MLP site of factual recall and makes its edit; None when it
    peaks there."""
    layer, pos, ie = trace_peak(trace)
    span, tokens = trace.subject, trace.str_tokens
    if pos == span.last:
        return None
    if span.start <= pos < span.last:
        where = f"an earlier subject token, {tokens[pos]!r} (token {pos - span.start + 1} of the subject's {len(span)})"
    elif pos > span.last:
        where = "the last prompt token" if pos == len(tokens) - 1 else f"{tokens[pos]!r}, after the subject"
    else:
        where = f"{tokens[pos]!r}, before the subject"
    column = trace.indirect_effect[:, span.last].nan_to_num(nan=float("-inf"))
    at_last = f"; there it reaches +{float(column.max()):.2f} at layer {int(column.argmax())}" if column.numel() else ""
    return (f"the MLP restoration peaks at {where}, layer {layer} (+{ie:.2f}), not at the last subject token "
            f"{tokens[span.last]!r}, where ROME (Meng et al. 2022) finds the MLP site of recall and writes its edit"
            f"{at_last}")


@dataclass(frozen=True)
class FactReport:
    """The four views of one fact (`four_views`). `effects` holds the knowledge neurons'
    suppress (×0) and amplify (×2) `NeuronEffect`s (empty when none were found); `answers` the
    model's top-1 answer to the fact's prompt, paraphrases and neighbours before and after the
    edit; `timings` seconds per step; `remarks` the warnings about the target (several tokens of
    which some views score the first; not predicted by the model), also shown in the report;
    `prompts_built` {"paraphrases"/"neighbours": how kvmem built them} for those it built."""

    fact: Fact
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    traces: TraceSet
    neurons: KnowledgeNeurons
    effects: tuple[NeuronEffect, ...]
    memories: FactMemories
    edit: Edit
    evaluation: CounterFactEval
    answers: tuple[dict, ...]
    samples: int
    stats_tokens: int
    timings: dict = field(default_factory=dict, compare=False)
    remarks: tuple[str, ...] = ()
    prompts_built: dict = field(default_factory=dict, compare=False)

    @property
    def mlp_trace(self):
        """The MLP causal trace (the first traced kind when MLPs were not traced)."""
        return self.traces["mlp"] if "mlp" in self.traces.kinds else self.traces.traces[0]

    def peak_remark(self) -> str | None:
        """Why the MLP trace's peak is not where ROME expects it, or None (`peak_remark`)."""
        return peak_remark(self.mlp_trace)

    @property
    def scores(self):
        """The edited model's CounterFact row (S, ES, PS, NS, ... ×100)."""
        return self.evaluation.summary().loc["ROME"]

    def not_computed(self) -> dict[str, str]:
        """{CounterFact metric: why it could not be computed} for the metrics that are NaN (PS, PM
        without paraphrases, NS, NM without neighbours, S without these): shown as "n/a (<reason>)"
        and written to JSON as null."""
        s, reasons = self.scores, {}
        for m, given, what in (("ES", True, ""), ("EM", True, ""), ("PS", self.paraphrases, "paraphrases"),
                               ("PM", self.paraphrases, "paraphrases"), ("NS", self.neighbours, "neighbours"),
                               ("NM", self.neighbours, "neighbours")):
            if m in s and math.isnan(float(s[m])):
                reasons[m] = f"no {what} given" if not given else "could not be computed"
                if not given and what in self.prompts_built:
                    reasons[m] = f"no {what}: none given, and kvmem found none"
        if math.isnan(float(s["S"])):
            reasons["S"] = "needs ES, PS and NS (" + (", ".join(m for m in ("ES", "PS", "NS") if m in reasons)
                                                       or "one of them") + " n/a)"
        return reasons

    def metric_text(self, m: str, fmt: str = ".0f") -> str:
        """A CounterFact metric as text: its value, or "n/a (<reason>)"."""
        reason = self.not_computed().get(m)
        return f"n/a ({reason})" if reason else format(float(self.scores[m]), fmt)

    def summary(self) -> dict:
        """The results as JSON-ready numbers (what `kvmem demo` writes to summary.json); a metric
        that cannot be computed is None, with its reason under "not_computed"."""
        f, mlp = self.fact, self.mlp_trace
        layer, pos, ie = trace_peak(mlp)
        top = self.memories.top_memories(1, "subject_last")[0]
        eff = {name: e.relative_change for (name, _), e in zip(FACTORS, self.effects)}
        missing = self.not_computed()
        return {
            "prompt": f.prompt, "subject": f.subject, "target_true": f.target_true, "target_new": f.target_new,
            "answer": self.traces.traces[0].answer, "p_clean": self.traces.p_clean, "p_corrupt": self.traces.p_corrupt,
            "mlp_peak": {"layer": layer, "token": mlp.str_tokens[pos], "indirect_effect": ie,
                         "at_last_subject_token": pos == mlp.subject.last, "remark": self.peak_remark()},
            "knowledge_neurons": [list(n) for n in self.neurons.neurons],
            "suppress_relative_change": eff.get("suppress"), "amplify_relative_change": eff.get("amplify"),
            "top_memory_subject_last": {"layer": top[0], "neuron": top[1], "push": top[2]},
            "edit_layer": self.edit.layer,
            "counterfact": {m: None if m in missing else float(self.scores[m]) for m in ("S", "ES", "PS", "NS")},
            "not_computed": missing,
            "answers": [dict(a) for a in self.answers],
            "remarks": list(self.remarks),
            "prompts_built": dict(self.prompts_built),
        }

    def lines(self) -> list[str]:
        """One sentence per view, for a terminal."""
        f, mlp = self.fact, self.mlp_trace
        layer, pos, ie = trace_peak(mlp)
        top = self.memories.top_memories(1, "subject_last")[0]
        eff = self.effects
        remark = self.peak_remark()
        return [
            f"1. causal tracing: p(answer) {self.traces.p_clean:.2f} clean, {self.traces.p_corrupt:.2f} with the "
            f"subject noised; MLP restoration peaks at layer {layer}, token {mlp.str_tokens[pos]!r} (+{ie:.2f})"
            + (f"\n   note: {remark}" if remark else ""),
            f"2. knowledge neurons: {len(self.neurons)} over {len(self.neurons.prompts)} prompts"
            + (f"; suppressing them {eff[0].relative_change:+.0%} (random {eff[0].control_relative_change:+.0%}), "
               f"amplifying {eff[1].relative_change:+.0%}" if eff else ""),
            f"3. memories: strongest push at the subject's last token: L{top[0]}.N{top[1]} ({top[2]:+.2f})",
            f"4. ROME at layer {self.edit.layer}: {f.target_true!r} -> {f.target_new!r}: "
            + ", ".join(f"{m} {self.metric_text(m)}" for m in ("ES", "PS", "NS", "S")),
        ] + [f"warning: {r}" for r in self.remarks]

    def to_frame(self):
        """The top-1 answers before and after the edit: prompt, kind, before, after."""
        import pandas as pd

        return pd.DataFrame(list(self.answers), columns=["prompt", "kind", "before", "after"])

    def plot(self, ax=None, *, title: str | None = None):
        """Four panels, one per view: the MLP causal trace, knowledge neurons per layer, each
        layer's memory push toward the answer, and the CounterFact metrics. Returns the Figure."""
        from kvmem.viz import figure_axes

        fig, axes = figure_axes(ax, 4, figsize=(20, 3.6))
        self.mlp_trace.plot(ax=axes[0])
        self.neurons.plot(ax=axes[1])
        self.memories.plot(ax=axes[2])
        self.evaluation.plot(ax=axes[3])
        fig.suptitle(title or f"{self.fact.prompt!r} → {self.fact.target_true!r}", fontsize=10)
        fig.tight_layout()
        return fig


def _top1(model, prompt: str) -> str:
    with torch.no_grad():
        logits = model(torch.tensor([encode(model, prompt)], device=model.cfg.device))[0, -1]
    return model.tokenizer.decode([int(logits.argmax())])


def _answers(model, fact: Fact, edit: Edit, paraphrases: Sequence[str], neighbours: Sequence[str]) -> tuple[dict, ...]:
    checks = [("rewrite", fact.prompt)]
    checks += [("paraphrase", p) for p in paraphrases[:N_ANSWERS]]
    checks += [("neighbour", p) for p in neighbours[:N_ANSWERS]]
    before = [_top1(model, p) for _, p in checks]
    with edited(model, edit, check=False):  # computed on this very model just now
        after = [_top1(model, p) for _, p in checks]
    return tuple({"prompt": p, "kind": kind, "before": b, "after": a} for (kind, p), b, a in zip(checks, before, after))


def _build_prompts(model, fact: Fact, paraphrases, neighbours, seed: int):
    """(paraphrases, neighbours, {what: how built}) with the missing ones built."""
    from kvmem.pipelines.fact_prompts import neighbour_prompts, paraphrase_prompts

    built = {}
    if not paraphrases:
        paraphrases = paraphrase_prompts(model, fact, seed=seed)
        built["paraphrases"] = f"{len(paraphrases)} built: the prompt after text the model wrote"
    if not neighbours:
        neighbours = neighbour_prompts(model, fact)
        built["neighbours"] = (f"{len(neighbours)} built: the prompt with other well-known subjects the model also "
                               f"answers {fact.target_true!r}")
    return tuple(paraphrases), tuple(neighbours), built


def four_views(
    model,
    fact: Fact,
    *,
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    neuron_prompts: Sequence[str] | None = None,
    stats=None,
    corpus=None,
    n_tokens: int | None = None,
    cache_dir=None,
    hparams: RomeHparams | None = None,
    window: int | None = None,
    samples: int = 10,
    steps: int = 20,
    seed: int = 0,
    build_prompts: bool = False,
    progress: bool | None = None,
) -> FactReport:
    """The four analyses of one fact (module docstring), each with the library's own function.

    `fact` needs `target_true` and `target_new` (what the edit writes). `paraphrases`: other
    prompts of the fact (PS, and the knowledge neurons' prompts); `neighbours`: prompts of other
    subjects whose answer the edit must keep (NS). `neuron_prompts`: the prompts knowledge neurons
    are shared across (default: the fact's prompt and its paraphrases). ROME uses `hparams`
    (default `rome_settings(model, facts=[fact])`) and `stats`, a `SecondMoment` of the edit layer;
    without it the statistics are computed (or read from the cache under `cache_dir`) over `corpus`
    (a text file, "wiki", "samples" or strings; default on factworld: its training text,
    `kvmem.factworld.corpus()`, elsewhere `default_corpus()`: the Wikipedia summaries when they are
    here, else the model's own samples) with `n_tokens` tokens (default
    `stats_tokens(model, corpus)`). `window`: causal tracing's MLP / attention window (default
    `kvmem.config.trace_window`); `samples` noise samples; `steps` integrated-gradients steps.
    `build_prompts`: build the paraphrases and neighbours not given
    (`kvmem.pipelines.fact_prompts`: the prompt after model-written context; the prompt with other
    well-known subjects the model answers the same), as the demo does on a real model.
    Arguments are checked before any computation. A target of several tokens (causal tracing and
    the memory view score its first token; knowledge neurons and ROME all of it) or one the model
    does not predict (`kvmem.config.predicts`) gives a `KvmemWarning`, kept in `remarks`.
    """
    if not isinstance(fact, Fact):
        raise InvalidArgumentError(f"four_views takes a kvmem.Fact, got {type(fact).__name__}.")
    if fact.target_true is None or fact.target_new is None:
        raise InvalidArgumentError("four_views needs the fact's target_true (the answer) and target_new "
                                   "(the object the ROME edit writes).")
    kind_windows(model, KINDS, window)  # a bad window fails here, not after the statistics
    if corpus is None and not is_factworld(model):
        corpus = default_corpus()  # nothing downloaded: the Wikipedia summaries when here, else samples
    paraphrases, neighbours = tuple(paraphrases), tuple(neighbours)
    # warned once here, for all views (an error under warnings.simplefilter("error", KvmemWarning))
    remarks = check_target(model, fact).warn(FIRST_TOKEN_VIEWS)
    hp = hparams or rome_settings(model, facts=[fact], progress=progress)
    timings: dict[str, float] = {}
    built: dict[str, str] = {}
    if build_prompts and not (paraphrases and neighbours):
        t = time.perf_counter()
        paraphrases, neighbours, built = _build_prompts(model, fact, paraphrases, neighbours, seed)
        timings["paraphrases and neighbours"] = time.perf_counter() - t
    if stats is None and hp.mom2_adjustment:
        if corpus is None:
            from kvmem.factworld import corpus as factworld_corpus

            corpus = factworld_corpus()
        t = time.perf_counter()
        n_tokens = n_tokens or stats_tokens(model, corpus)
        if isinstance(corpus, str) and corpus == SAMPLES:
            corpus = model_samples(model, n_tokens, seed=seed, cache_dir=cache_dir, progress=progress)
        stats = second_moment(model, hp.layer, corpus, n_tokens=n_tokens, cache_dir=cache_dir, progress=progress)
        timings["ROME statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmemWarning)  # already said above, for every view
        traces = trace_all(model, fact, window=window, samples=samples, seed=seed, progress=progress)
    timings["causal tracing"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = list(dict.fromkeys(neuron_prompts or [fact.prompt, *paraphrases]))
    kn = knowledge_neurons(model, prompts, fact.target_true, steps=steps, progress=False)
    effects = tuple(neuron_effect(model, prompts, fact.target_true, neurons=kn, factor=factor, seed=seed)
                    for _, factor in FACTORS) if kn.neurons else ()
    timings["knowledge neurons"] = time.perf_counter() - t

    t = time.perf_counter()
    memories = fact_memories(model, fact)
    timings["memories"] = time.perf_counter() - t

    t = time.perf_counter()
    edit = compute_rome_edit(model, fact, stats=stats, hparams=hp)
    record = CounterFactRecord(case_id=0, request=fact, template=fact.prompt.replace(fact.subject, "{}", 1),
                               paraphrase_prompts=paraphrases, neighborhood_prompts=neighbours,
                               attribute_prompts=(), generation_prompts=())
    evaluation = evaluate_counterfact(model, [record], editor=lambda m, r: edit, generation=False, progress=False)
    answers = _answers(model, fact, edit, paraphrases, neighbours)
    timings["ROME edit + evaluation"] = time.perf_counter() - t
    return FactReport(
        fact=fact, paraphrases=paraphrases, neighbours=neighbours, traces=traces, neurons=kn, effects=effects,
        memories=memories, edit=edit, evaluation=evaluation, answers=answers, samples=samples,
        stats_tokens=int(stats.n_tokens) if stats is not None else 0, timings=timings, remarks=remarks,
        prompts_built=built,
    )


__all__ = ["four_views", "FactReport", "trace_peak", "peak_remark"]
