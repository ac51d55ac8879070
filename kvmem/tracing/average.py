"""ROME's average indirect effect (fig. 2): trace many facts, average per kind x token bucket x layer.

Each fact is traced with `prepare_fact` / `trace_prepared` (`kvmem.tracing.trace`) and reduced to
a per-fact record (its bucket effects and full score grids), which a resumable run log
(`kvmem.runs.RunLog`) can keep; the average is computed from the records alone, so a run resumed
from its log gives the same numbers as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from functools import partial
from typing import Sequence

import torch

from kvmem import config
from kvmem.core.facts import Fact, SubjectSpan
from kvmem.errors import InvalidArgumentError, MultiTokenTargetWarning, UnpredictedFactWarning
from kvmem.tracing.results import AverageEffect, CausalTrace
from kvmem.tracing.trace import (
    KINDS,
    PreparedFact,
    check_trace_args,
    kind_windows,
    noise_level,
    prepare_fact,
    trace_prepared,
)

BUCKETS: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def token_buckets(subject: SubjectSpan, n_pos: int) -> tuple[tuple[int, ...], ...]:
    """Positions in ROME's six buckets: first / middle / last subject token, first after the
    subject, further tokens, last token. A position may be in two buckets (a one-token subject is
    both first and last subject token), as in ROME."""
    first, last_subj, last = subject.start, subject.end - 1, n_pos - 1
    after = subject.end
    return (
        (first,),
        tuple(range(first + 1, last_subj)),
        (last_subj,),
        (after,) if after <= last else (),
        tuple(range(after + 1, last)),
        (last,),
    )


def fact_key(fact: Fact) -> str:
    """A stable key for a fact in a run log (its prompt, subject and targets)."""
    blob = json.dumps([fact.prompt, fact.subject, fact.target_true, fact.target_new])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def fact_record(prepared: PreparedFact, traces: Sequence[CausalTrace] | None) -> dict:
    """What a run log keeps of one fact: per kind, the mean indirect effect of each token bucket
    by layer (None for an empty bucket), and the full score grids. `traces` is None for a fact
    the model answers wrongly (it is counted, not traced)."""
    rec = {
        "prompt": prepared.tf.fact.prompt,
        "subject": prepared.tf.fact.subject,
        "target": prepared.tf.fact.target_true,
        "answer": prepared.answer,
        "correct": bool(prepared.correct),
        "p_clean": prepared.p_clean,
    }
    if traces is None:
        return rec
    buckets = token_buckets(prepared.tf.subject, prepared.tf.n_tokens)
    rec["p_corrupt"] = traces[0].p_corrupt
    rec["str_tokens"] = list(prepared.tf.str_tokens)
    rec["subject_span"] = [prepared.tf.subject.start, prepared.tf.subject.end]
    rec["bucket_ie"] = {
        tr.kind: [
            None if not pos else (tr.scores[:, list(pos)].double() - tr.p_corrupt).mean(dim=1).tolist()
            for pos in buckets
        ]
        for tr in traces
    }
    rec["scores"] = {tr.kind: [[round(float(v), 7) for v in row] for row in tr.scores] for tr in traces}
    return rec


def average_records(
    records: Sequence[dict], kinds: tuple[str, ...], n_layers: int, *, noise: float, window: int, samples: int,
    method: str = "exact",
) -> AverageEffect:
    """The `AverageEffect` of per-fact records (`fact_record`): facts answered wrongly are
    skipped; each bucket averages over the facts that have it. `method`: how the records' grids
    were computed ("exact", or `kvmem.tracing.attribution.method_label`)."""
    used = [r for r in records if r["correct"]]
    ie_sum = torch.zeros(len(kinds), len(BUCKETS), n_layers, dtype=torch.float64)
    score_sum = torch.zeros_like(ie_sum)
    counts = torch.zeros(len(BUCKETS), dtype=torch.long)
    for r in used:
        for b in range(len(BUCKETS)):
            if r["bucket_ie"][kinds[0]][b] is None:
                continue
            counts[b] += 1
            for k, kind in enumerate(kinds):
                ie = torch.tensor(r["bucket_ie"][kind][b], dtype=torch.float64)
                ie_sum[k, b] += ie
                score_sum[k, b] += ie + r["p_corrupt"]
    if not used:
        warnings.warn(
            f"The model answered none of the {len(records)} facts correctly; the average effect is NaN.",
            stacklevel=3,
        )
    denom = counts.to(torch.float64)[None, :, None]
    nan = float("nan")
    return AverageEffect(
        kinds=kinds,
        buckets=BUCKETS,
        aie=(ie_sum / denom).float(),
        mean_score=(score_sum / denom).float(),
        counts=counts,
        n_facts=len(used),
        n_skipped=len(records) - len(used),
        p_clean=sum(r["p_clean"] for r in used) / len(used) if used else nan,
        p_corrupt=sum(r["p_corrupt"] for r in used) / len(used) if used else nan,
        noise=noise,
        window=window,
        samples=samples,
        method=method,
    )


def average_indirect_effect(
    model,
    facts: Sequence[Fact],
    *,
    kinds: Sequence[str] = KINDS,
    window: int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    log: str | None = None,
    restart: bool = False,
    method: str | None = None,
    steps: int | None = None,
    executor=None,
) -> AverageEffect:
    """ROME's average indirect effect over `facts`, per kind x token bucket x layer.

    As in ROME, each fact contributes the mean over its tokens in a bucket, and a bucket's
    average is over the facts that have it (a one-token subject has no middle tokens); `counts`
    says how many facts each bucket averages. Facts the model gets wrong (top token != first
    target token) are skipped and counted in `n_skipped`; each skipped fact, each traced fact
    predicted with p below `kvmem.config.PREDICTED_MIN_P`, and each target of several tokens (traced
    on its first) gets a `KvmemWarning` naming it (`fact_remarks`; errors under
    `warnings.simplefilter("error", KvmemWarning)`, the CLI's `--strict`). `window` applies to "mlp" and "attn"
    (default `kvmem.config.trace_window`). Noise defaults to `noise_level(model, facts)`. Every
    fact uses the same `seed`. `progress`: a bar over facts (None: `kvmem.config.PROGRESS`).

    `log`: a path to a resumable run log (`kvmem.runs.RunLog`, one JSON line per fact with its
    bucket effects and full score grids). Rerunning with the same settings skips finished facts;
    other settings raise unless `restart=True`.

    `method`: None traces exactly (`trace_prepared`); "atp", "atp*", "ig" or "eap-ig" estimates
    each fact's grids from gradients (`kvmem.tracing.attribution`, `steps` as there), on the same
    noise samples; the result's `method` says which.

    `executor`: where the facts are traced (`kvmem.executors`): None or "serial" in this process,
    "ray" (or a `RayExecutor`) on Ray workers that load the model by the name `kvmem.load_model`
    recorded; the records, and so the average, do not depend on the executor.
    """
    check_trace_args(model, samples, noise, seed)
    label = "exact"
    if method is not None:
        from kvmem.tracing.attribution import check_method, method_label

        steps = check_method(method, steps)
        label = method_label(method, steps)
    elif steps is not None:
        raise InvalidArgumentError(f"steps={steps!r} is the path of an attribution method: pass method='ig' or "
                                   "'eap-ig' with it, or leave steps out for exact tracing.")
    facts = list(facts)
    if not facts:
        raise InvalidArgumentError("average_indirect_effect needs at least one fact.")
    spec = kind_windows(model, kinds, window)
    kinds = tuple(kind for kind, _, _ in spec)
    if window is None:
        window = config.trace_window(model.cfg.n_layers)
    if noise is None:
        noise = noise_level(model, facts)
    keys = [fact_key(f) for f in facts]
    if len(set(keys)) != len(keys):
        raise InvalidArgumentError("The same fact appears twice in `facts`; remove the duplicates.")
    run_log = None
    if log is not None:
        from kvmem.core.fingerprint import model_fingerprint
        from kvmem.runs import RunLog

        settings = {
            "analysis": "average_indirect_effect", "model": model_fingerprint(model), "kinds": list(kinds),
            "window": window, "noise": float(noise), "samples": samples, "seed": seed,
        }
        if method is not None:  # exact runs keep the settings (and logs) they always had
            settings.update(method=method, steps=steps)
        run_log = RunLog(log, settings, restart=restart)
    from kvmem.executors import Work, get_executor, run_items
    from kvmem.executors.work import model_setup

    executor = get_executor(executor)
    setup = model_setup(model, executor)  # Ray workers load the model by its name, checked by its weights
    compute = partial(_trace_fact, spec, float(noise), samples, seed, batch_size, memory_budget, method, steps)
    bar = None
    if config.show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), desc="causal tracing", unit="fact",
                   initial=sum(k in run_log for k in keys) if run_log is not None else 0)
    try:
        records = run_items(list(zip(keys, facts)), Work(setup, compute, local=model), log=run_log,
                            executor=executor, on_done=(lambda _: bar.update()) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    for i, key in enumerate(keys):  # facts whose result may mislead, named in the facts' order
        for category, message in fact_remarks(model, [facts[i]], [records[key]], first=i):
            warnings.warn(message, category, stacklevel=2)
    return average_records(
        [records[k] for k in keys], kinds, model.cfg.n_layers, noise=float(noise), window=window, samples=samples,
        method=label,
    )


def _trace_fact(spec, noise: float, samples: int, seed: int, batch_size, memory_budget, method: str | None,
                steps: int | None, model, fact: Fact) -> dict:
    """One fact's record (`fact_record`), traced exactly or estimated by attribution `method` when
    the model answers it (else only counted), with the seconds it took; the work of one item."""
    t0 = time.perf_counter()
    prepared = prepare_fact(model, fact, require_target=True)
    traces = None
    kw = dict(noise=noise, samples=samples, seed=seed, batch_size=batch_size, memory_budget=memory_budget)
    if prepared.correct and method is None:
        traces = trace_prepared(model, prepared, spec, progress=False, **kw)
    elif prepared.correct:
        from kvmem.tracing.attribution import attribution_prepared
        from kvmem.tracing.trace import corrupted_run

        base = corrupted_run(model, prepared, noise=noise, samples=samples, seed=seed)
        traces = attribution_prepared(model, prepared, spec, method=method, steps=steps, base=base, **kw)
    rec = fact_record(prepared, traces)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def fact_remarks(model, facts: Sequence[Fact], records: Sequence[dict], *, first: int = 0) -> list[tuple[type[Warning], str]]:
    """(warning class, message) for each fact whose result may mislead, by the rules the single-fact
    analyses use (`kvmem.tracing.checks`): a fact skipped because the model's top next token is not
    the target's first token; a traced fact the model does not predict (`kvmem.config.predicts`:
    its top token, but with p below `PREDICTED_MIN_P`); a traced target of several tokens, scored
    on its first token only. Read from the run records, so a resumed run says the same. `first`:
    the index of `facts[0]` in the caller's list (messages name facts by index)."""
    from kvmem.core.tokenize import target_token_ids

    out: list[tuple[type[Warning], str]] = []
    for i, (fact, rec) in enumerate(zip(facts, records), start=first):
        name = f"fact {i} ({fact.prompt!r} -> {fact.target_true!r})"
        if not rec["correct"]:
            out.append((UnpredictedFactWarning,
                        f"{name} is skipped: the model's top next token is not the target's first token "
                        f"{rec['answer']!r} (p = {rec['p_clean']:.2g}); the average counts it in n_skipped "
                        "(ROME averages the facts the model answers)"))
            continue
        if not config.predicts(0, rec["p_clean"]):
            out.append((UnpredictedFactWarning,
                        f"{name} is traced with p = {rec['p_clean']:.2g} for its answer {rec['answer']!r}, "
                        f"the top token but below kvmem.config.PREDICTED_MIN_P = {config.PREDICTED_MIN_P}: "
                        "its indirect effects are differences of small numbers"))
        n = len(target_token_ids(model, fact.prompt, fact.target_true))
        if n > 1:
            out.append((MultiTokenTargetWarning,
                        f"{name}: the target is {n} tokens; causal tracing scores its first token "
                        f"{rec['answer']!r} only"))
    return out


__all__ = [
    "BUCKETS", "average_indirect_effect", "average_records", "fact_key", "fact_record", "fact_remarks",
    "token_buckets",
]
