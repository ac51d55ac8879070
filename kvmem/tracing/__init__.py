"""Causal tracing (Meng et al., ROME, 2022): where in the network a fact is recalled.

Run the fact's prompt clean; run it `samples` times with Gaussian noise on the subject tokens'
embeddings; then restore one clean state inside the corrupted runs and measure how much of the
clean answer's probability comes back. `causal_trace` does one kind of state for one fact,
`trace_all` the three kinds together, `average_indirect_effect` averages many facts in ROME's
six token buckets.

ROME conventions kept here (checked against ROME's `experiments/causal_trace.py`):
- "resid" restores the output of block l (`hook_resid_post`), one layer at a time.
- "mlp"/"attn" restore the MLP / attention output of the layers `[l - w//2, l + w - w//2)`
  clipped to the model, at one token (`window=10` in ROME's figures).
- the answer is the clean run's top token (the target's first token when the fact has one);
  scores are its probability, averaged over the noise samples; every cell sees the same samples.
- noise = 3 x the standard deviation of the subject tokens' embeddings (`noise_level`).
- severed tracing (ROME fig. 3 / appendix): restore the residual at (l, t) while the MLP (or
  attention) outputs at token t are held at their corrupted values in every layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.errors import EmptyTargetError, InvalidArgumentError
from kvmem.core.hooks import EMBED_HOOK, add_noise, check_has_embed_hook
from kvmem.core.engine import (
    DEFAULT_MEMORY_BUDGET,
    Intervention,
    RecordedRun,
    Site,
    record_run,
    run_interventions,
)
from kvmem.core.facts import Fact, SubjectSpan, TokenizedFact, tokenize_fact

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
COMPONENT_OF_KIND = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
BUCKETS: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CausalTrace:
    """One fact, one kind of state: `scores[l, t]` = answer probability with (l, t) restored."""

    kind: str
    scores: Float[Tensor, "layer pos"]
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

    def plot(self, ax=None, title: str | None = None):
        """ROME-style heatmap: tokens down (subject marked '*'), layers across."""
        from kvmem.viz import plot_trace

        return plot_trace(self, ax=ax, title=title)

    def show(self):
        """Interactive circuitsvis view (inline JavaScript, works offline)."""
        from kvmem.viz import show_traces

        return show_traces([self])


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

    def plot(self, title: str | None = None):
        from kvmem.viz import plot_traces

        return plot_traces(self.traces, title=title)

    def show(self):
        from kvmem.viz import show_traces

        return show_traces(self.traces)


@dataclass(frozen=True)
class AverageEffect:
    """Average indirect effects over facts, per kind x token bucket x layer (ROME fig. 2).
    `counts[b]`: how many facts have bucket b (and so enter its average)."""

    kinds: tuple[str, ...]
    buckets: tuple[str, ...]
    aie: Float[Tensor, "kind bucket layer"]
    mean_score: Float[Tensor, "kind bucket layer"]
    counts: Int[Tensor, "bucket"]
    n_facts: int
    n_skipped: int
    p_clean: float
    p_corrupt: float
    noise: float
    window: int
    samples: int

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

    def plot(self, title: str | None = None):
        """AIE by layer, one panel per kind, one curve per token bucket."""
        from kvmem.viz import plot_average_effect

        return plot_average_effect(self, title=title)


# --------------------------------------------------------------------------------------------
# Checks and shared pieces


def _check_common(model, samples: int, noise: float | None, seed: int) -> None:
    check_has_embed_hook(model)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError(f"samples must be an int >= 1 (ROME uses 10), got {samples!r}.")
    if noise is not None and (not isinstance(noise, (int, float)) or noise < 0 or noise != noise):
        raise InvalidArgumentError(f"noise must be a non-negative float or None (3 x subject std), got {noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an int, got {seed!r}.")


def _check_kind(model, kind: str, window: int) -> None:
    if kind not in KINDS:
        raise InvalidArgumentError(f"Unknown kind {kind!r}; use 'resid', 'mlp' or 'attn'.")
    n = model.cfg.n_layers
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n:
        raise InvalidArgumentError(
            f"window must be an int in [1, {n}] (the model has {n} layers), got {window!r}."
        )
    if kind == "mlp" and f"blocks.0.hook_mlp_out" not in model.hook_dict:
        raise InvalidArgumentError("This model has no MLP outputs (hook_mlp_out) to trace; use kind='resid' or 'attn'.")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window around `layer`: `[layer - window//2, layer + window - window//2)`, clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


def noise_level(model, facts: Sequence[Fact] | Fact, factor: float = 3.0) -> float:
    """`factor` x the standard deviation of the subject tokens' embeddings over `facts` (ROME: 3)."""
    check_has_embed_hook(model)
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts:
        raise InvalidArgumentError("noise_level needs at least one fact.")
    ids = []
    for f in facts:
        tf = tokenize_fact(model, f, target=None)
        ids.append(tf.tokens[tf.subject.start : tf.subject.end])
    tokens = torch.cat(ids).to(model.cfg.device)
    with torch.no_grad():
        emb = model.embed(tokens[None])[0].float()
    return float(factor * emb.std())


def _answer_probability(answer_id: int):
    def metric(logits: Tensor) -> Tensor:
        logits = logits.float()
        return torch.exp(logits[:, answer_id] - torch.logsumexp(logits, dim=-1))

    return metric


@dataclass(frozen=True)
class _Prepared:
    tf: TokenizedFact
    clean: RecordedRun
    answer_id: int
    answer: str
    correct: bool | None
    p_clean: float


@torch.no_grad()
def _prepare(model, fact: Fact, require_target: bool = False) -> _Prepared:
    if not isinstance(fact, Fact):
        raise InvalidArgumentError(f"Expected a kvmem.Fact, got {type(fact).__name__}.")
    has_target = fact.target_true is not None
    if require_target and not has_target:
        raise EmptyTargetError(
            f"Fact for subject {fact.subject!r} has no target_true; averaging needs known answers."
        )
    tf = tokenize_fact(model, fact, target="true" if has_target else None)
    clean = record_run(model, tf.tokens)
    logits = clean.final_logits(model)[0]
    top = int(logits.argmax())
    if has_target:
        answer_id, correct = int(tf.target_ids[0]), top == int(tf.target_ids[0])
    else:
        answer_id, correct = top, None
    p_clean = float(torch.softmax(logits.float(), -1)[answer_id])
    return _Prepared(tf, clean, answer_id, model.tokenizer.decode([answer_id]), correct, p_clean)


def _interventions(kind: str, window: int, n_layers: int, positions: Sequence[int], sever: str | None) -> list[Intervention]:
    component = COMPONENT_OF_KIND[kind]
    out = []
    for layer in range(n_layers):
        layers = range(layer, layer + 1) if window == 1 else window_layers(layer, window, n_layers)
        for pos in positions:
            restore = tuple(Site(component, l, pos) for l in layers)
            freeze = ()
            if sever is not None:
                freeze = tuple(Site(COMPONENT_OF_KIND[sever], l, pos) for l in range(n_layers))
            out.append(Intervention(restore, freeze))
    return out


@torch.no_grad()
def _trace_prepared(
    model,
    prep: _Prepared,
    kinds: Sequence[tuple[str, int, str | None]],
    noise: float,
    samples: int,
    seed: int,
    max_batch: int | None,
    memory_budget: int,
    progress: bool,
    positions: Sequence[int] | None = None,
) -> list[CausalTrace]:
    """`positions`: the token positions to restore (default all); the other cells are NaN."""
    tf = prep.tf
    subject = range(tf.subject.start, tf.subject.end)
    corrupt = record_run(
        model, tf.tokens, fwd_hooks=[(EMBED_HOOK, add_noise(subject, noise, seed=seed))], n_rows=samples
    )
    metric = _answer_probability(prep.answer_id)
    n_layers, n_pos = model.cfg.n_layers, tf.n_tokens
    positions = list(range(n_pos)) if positions is None else list(positions)
    cells: list[Intervention] = []
    for kind, window, sever in kinds:
        cells += _interventions(kind, window, n_layers, positions, sever)
    values = run_interventions(
        model, corrupt, prep.clean, cells, metric, max_batch=max_batch,
        memory_budget=memory_budget, progress=progress,
    )
    p_corrupt = float(metric(corrupt.final_logits(model)).float().mean())
    traced = values.mean(dim=1).reshape(len(kinds), n_layers, len(positions))
    per_kind = torch.full((len(kinds), n_layers, n_pos), float("nan"), dtype=traced.dtype, device=traced.device)
    per_kind[:, :, positions] = traced
    return [
        CausalTrace(
            kind=kind, scores=per_kind[k].cpu(), p_clean=prep.p_clean, p_corrupt=p_corrupt,
            str_tokens=tf.str_tokens, subject=tf.subject, answer=prep.answer, answer_id=prep.answer_id,
            correct=prep.correct, window=window, noise=float(noise), samples=samples, seed=seed,
            sever=sever, fact=tf.fact,
        )
        for k, (kind, window, sever) in enumerate(kinds)
    ]


# --------------------------------------------------------------------------------------------
# Public API


def causal_trace(
    model,
    fact: Fact,
    kind: str = "resid",
    window: int = 1,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    sever: str | None = None,
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    positions: Sequence[int] | str | None = None,
) -> CausalTrace:
    """Trace one fact: restore each (layer, token) of `kind` in the noise-corrupted runs.

    `kind`: "resid" (block outputs), "mlp" or "attn" (outputs of the layers in a `window`
    around each layer; ROME's figures use `window=10`). `noise`: the noise scale; None means
    `noise_level(model, [fact])` (3 x the std of this fact's subject embeddings; pass
    `noise_level(model, facts)` over a data set to match ROME). `sever="mlp"` / `"attn"` (with
    kind="resid") holds that sublayer's outputs at the restored token at their corrupted values.
    The answer is `fact.target_true`'s first token if given (`correct` says whether the model's top
    token agrees), otherwise the model's top token. `positions`: restore only these token
    positions, or "subject_last" (the other cells of `scores` are NaN); the cost is proportional
    to the number of positions, so one column costs ~1/n_tokens of the full grid.
    """
    _check_common(model, samples, noise, seed)
    _check_kind(model, kind, window)
    if sever is not None:
        if sever not in ("mlp", "attn"):
            raise InvalidArgumentError(f"sever must be 'mlp', 'attn' or None, got {sever!r}.")
        if kind != "resid":
            raise InvalidArgumentError("Severed tracing restores the residual: use kind='resid' with sever=....")
        _check_kind(model, sever, 1)
    prep = _prepare(model, fact)
    positions = _positions(prep, positions)
    if noise is None:
        noise = noise_level(model, [fact])
    (trace,) = _trace_prepared(
        model, prep, [(kind, window, sever)], noise, samples, seed, max_batch, memory_budget, progress, positions
    )
    return trace


def _positions(prep: _Prepared, positions) -> list[int] | None:
    if positions is None:
        return None
    n_pos = prep.tf.n_tokens
    if isinstance(positions, str):
        if positions != "subject_last":
            raise InvalidArgumentError(f"positions must be token indices or 'subject_last', got {positions!r}.")
        return [prep.tf.subject.last]
    out = list(positions)
    if not out or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_pos for p in out):
        raise InvalidArgumentError(f"positions must be distinct token indices in [0, {n_pos}) for this prompt, got {positions!r}.")
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"positions repeat an index: {positions!r}.")
    return out


def trace_all(
    model,
    fact: Fact,
    window: int = 1,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> TraceSet:
    """`causal_trace` for several kinds at once, sharing the clean and corrupted runs.

    `window` applies to "mlp" and "attn"; "resid" always restores one layer (as ROME does).
    Pass `window=10` for ROME's figure 1.
    """
    _check_common(model, samples, noise, seed)
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgumentError("kinds is empty; pass some of 'resid', 'mlp', 'attn'.")
    spec = []
    for kind in kinds:
        _check_kind(model, kind, window)
        spec.append((kind, 1 if kind == "resid" else window, None))
    prep = _prepare(model, fact)
    if noise is None:
        noise = noise_level(model, [fact])
    return TraceSet(
        tuple(_trace_prepared(model, prep, spec, noise, samples, seed, max_batch, memory_budget, progress))
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
    import hashlib
    import json

    blob = json.dumps([fact.prompt, fact.subject, fact.target_true, fact.target_new])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _fact_record(prep: _Prepared, traces: Sequence[CausalTrace] | None) -> dict:
    """What a run log keeps of one fact: per kind, the mean indirect effect of each token bucket
    by layer (None for an empty bucket), and the full score grids."""
    rec = {
        "prompt": prep.tf.fact.prompt,
        "subject": prep.tf.fact.subject,
        "target": prep.tf.fact.target_true,
        "answer": prep.answer,
        "correct": bool(prep.correct),
        "p_clean": prep.p_clean,
    }
    if traces is None:
        return rec
    buckets = token_buckets(prep.tf.subject, prep.tf.n_tokens)
    rec["p_corrupt"] = traces[0].p_corrupt
    rec["str_tokens"] = list(prep.tf.str_tokens)
    rec["subject_span"] = [prep.tf.subject.start, prep.tf.subject.end]
    rec["bucket_ie"] = {
        tr.kind: [
            None if not pos else (tr.scores[:, list(pos)].double() - tr.p_corrupt).mean(dim=1).tolist()
            for pos in buckets
        ]
        for tr in traces
    }
    rec["scores"] = {tr.kind: [[round(float(v), 7) for v in row] for row in tr.scores] for tr in traces}
    return rec


def _average_records(records: Sequence[dict], kinds: tuple[str, ...], n_layers: int, **meta) -> AverageEffect:
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
        import warnings

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
        **meta,
    )


def average_indirect_effect(
    model,
    facts: Sequence[Fact],
    kinds: Sequence[str] = KINDS,
    window: int = 1,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    max_batch: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    log: str | None = None,
    restart: bool = False,
) -> AverageEffect:
    """ROME's average indirect effect over `facts`, per kind x token bucket x layer.

    As in ROME, each fact contributes the mean over its tokens in a bucket, and a bucket's
    average is over the facts that have it (a one-token subject has no middle tokens); `counts`
    says how many facts each bucket averages. Facts the model gets wrong (top token != first
    target token) are skipped and counted in `n_skipped`. Noise defaults to
    `noise_level(model, facts)`. Every fact uses the same `seed`.

    `log`: a path to a resumable run log (`kvmem.runs.RunLog`, one JSON line per fact with its
    bucket effects and full score grids). Rerunning with the same settings skips finished facts;
    other settings raise unless `restart=True`.
    """
    _check_common(model, samples, noise, seed)
    facts = list(facts)
    if not facts:
        raise InvalidArgumentError("average_indirect_effect needs at least one fact.")
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgumentError("kinds is empty; pass some of 'resid', 'mlp', 'attn'.")
    spec = []
    for kind in kinds:
        _check_kind(model, kind, window)
        spec.append((kind, 1 if kind == "resid" else window, None))
    if noise is None:
        noise = noise_level(model, facts)
    keys = [fact_key(f) for f in facts]
    if len(set(keys)) != len(keys):
        raise InvalidArgumentError("The same fact appears twice in `facts`; remove the duplicates.")
    run_log = None
    if log is not None:
        from kvmem.editing.fingerprint import model_fingerprint
        from kvmem.runs import RunLog

        settings = {
            "analysis": "average_indirect_effect", "model": model_fingerprint(model), "kinds": list(kinds),
            "window": window, "noise": float(noise), "samples": samples, "seed": seed,
        }
        run_log = RunLog(log, settings, restart=restart)
    records: dict[str, dict] = dict(run_log.records()) if run_log is not None else {}
    iterator = list(zip(keys, facts))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="causal tracing", unit="fact", initial=0)
    for key, fact in iterator:
        if key in records:
            continue
        t0 = time.perf_counter()
        prep = _prepare(model, fact, require_target=True)
        traces = None
        if prep.correct:
            traces = _trace_prepared(model, prep, spec, noise, samples, seed, max_batch, memory_budget, False)
        rec = _fact_record(prep, traces)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records[key] = rec
        if run_log is not None:
            run_log.add(key, rec)
    return _average_records(
        [records[k] for k in keys], kinds, model.cfg.n_layers, noise=float(noise), window=window, samples=samples
    )
