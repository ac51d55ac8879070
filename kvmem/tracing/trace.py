"""Tracing one fact: the clean run, the noise-corrupted runs, and every restoration cell.

`prepare_fact` tokenizes a fact and records its clean run once; `trace_prepared` corrupts it and
evaluates the restorations of one or several kinds through the shared engine
(`kvmem.core.engine`). `causal_trace` and `trace_all` are the checked public entry points;
`average_indirect_effect` (`kvmem.tracing.average`) reuses the same two steps per fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from kvmem import config
from kvmem.core.engine import Intervention, RecordedRun, Site, record_run, run_interventions
from kvmem.core.facts import Fact, TokenizedFact, tokenize_fact
from kvmem.core.hooks import EMBED_HOOK, add_noise, check_has_embed_hook, has_hook
from kvmem.core.weights import token_embeddings
from kvmem.errors import EmptyTargetError, InvalidArgumentError
from kvmem.tracing.checks import target_check_from_logits
from kvmem.tracing.results import CausalTrace, TraceSet

Kind = Literal["resid", "mlp", "attn"]
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
COMPONENT_OF_KIND = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}

# (kind, window, sever): one grid of restorations
TraceSpec = tuple[str, int, str | None]


# --------------------------------------------------------------------------------------------
# Checks


def check_trace_args(model, samples: int, noise: float | None, seed: int) -> None:
    """The arguments every tracing entry point shares."""
    check_has_embed_hook(model)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError(f"samples must be an int >= 1 (ROME uses 10), got {samples!r}.")
    if noise is not None and (not isinstance(noise, (int, float)) or noise < 0 or noise != noise):
        raise InvalidArgumentError(f"noise must be a non-negative float or None (3 x subject std), got {noise!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an int, got {seed!r}.")


def _check_kind(model, kind: str, window: int | None) -> None:
    if kind not in KINDS:
        raise InvalidArgumentError(f"Unknown kind {kind!r}; use 'resid', 'mlp' or 'attn'.")
    n = model.cfg.n_layers
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n:
        raise InvalidArgumentError(
            f"window must be an int in [1, {n}] (the model has {n} layers), got {window!r}."
        )
    if kind == "mlp" and not has_hook(model, "blocks.0.hook_mlp_out"):
        raise InvalidArgumentError("This model has no MLP outputs (hook_mlp_out) to trace; use kind='resid' or 'attn'.")


def kind_windows(model, kinds: Sequence[str], window: int | None) -> list[TraceSpec]:
    """Checked (kind, window, None) per kind: "resid" restores one layer (as ROME does); "mlp" and
    "attn" use `window`, by default `kvmem.config.default_window` (ROME's, scaled to the model)."""
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgumentError("kinds is empty; pass some of 'resid', 'mlp', 'attn'.")
    spec = []
    for kind in kinds:
        w = config.default_window(kind, model.cfg.n_layers) if window is None else window
        _check_kind(model, kind, w)
        spec.append((kind, 1 if kind == "resid" else w, None))
    return spec


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window around `layer`: `[layer - window//2, layer + window - window//2)`, clipped
    (window 1: `layer` alone). The one definition: exact traces and their attribution estimates
    restore these layers."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


def noise_level(model, facts: Sequence[Fact] | Fact, *, factor: float = 3.0) -> float:
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
        emb = token_embeddings(model, tokens).float()
    return float(factor * emb.std())


def answer_probability(answer_id: int):
    """The metric of a trace: the answer token's probability from next-token logits `[rows, vocab]`."""

    def metric(logits: Tensor) -> Tensor:
        logits = logits.float()
        return torch.exp(logits[:, answer_id] - torch.logsumexp(logits, dim=-1))

    return metric


# --------------------------------------------------------------------------------------------
# Preparation and the restoration grid


@dataclass(frozen=True)
class PreparedFact:
    """A fact ready to trace: its tokens, its recorded clean run and the answer traced."""

    tf: TokenizedFact
    clean: RecordedRun
    answer_id: int
    answer: str
    correct: bool | None  # the model's top token is the target's first token (None: no target)
    p_clean: float
    # next-token logits of the clean run (`[d_vocab]`), kept so that checks do not unembed it again
    clean_logits: Tensor | None = field(default=None, repr=False, compare=False)


@torch.no_grad()
def prepare_fact(model, fact: Fact, *, require_target: bool = False) -> PreparedFact:
    """Tokenize `fact` and record its clean run. The answer is the target's first token when the
    fact has one (`correct` says whether the model's top token agrees), else the top token."""
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
    return PreparedFact(tf, clean, answer_id, model.tokenizer.decode([answer_id]), correct, p_clean, logits)


@torch.no_grad()
def warn_target(model, prepared: PreparedFact) -> None:
    """Warn when causal tracing scores only the first token of the fact's target, or the model
    does not predict the target (`kvmem.tracing.checks`); nothing when the fact has no target
    (the model's own top token is traced)."""
    tf = prepared.tf
    if tf.fact.target_true is None:
        return
    logits = prepared.clean_logits if prepared.clean_logits is not None else prepared.clean.final_logits(model)[0]
    check = target_check_from_logits(model, tf.fact.prompt, tf.fact.target_true, tf.target_ids, logits)
    check.warn("causal tracing", stacklevel=5)  # the caller of causal_trace / trace_all


@torch.no_grad()
def corrupted_run(model, prepared: PreparedFact, *, noise: float, samples: int, seed: int) -> RecordedRun:
    """The noise-corrupted run of a prepared fact: `samples` rows, Gaussian noise of scale `noise`
    on the subject tokens' embeddings (row r gets noise sample r of `seed`)."""
    tf = prepared.tf
    subject = range(tf.subject.start, tf.subject.end)
    return record_run(
        model, tf.tokens, fwd_hooks=[(EMBED_HOOK, add_noise(subject, noise, seed=seed))], n_rows=samples
    )


@torch.no_grad()
def corrupted_prompt_run(model, prepared: PreparedFact, corrupted: str) -> RecordedRun:
    """The run of a user-given corrupted prompt (one row), which must tokenize to as many tokens
    as the fact's prompt (each cell restores the clean state at the same position)."""
    from kvmem.core.tokenize import encode

    if not isinstance(corrupted, str) or not corrupted:
        raise InvalidArgumentError(f"corrupted must be a non-empty prompt string, got {corrupted!r}.")
    tokens = torch.tensor(encode(model, corrupted), dtype=torch.long)
    n = prepared.tf.n_tokens
    if tokens.shape[0] != n:
        raise InvalidArgumentError(
            f"The corrupted prompt {corrupted!r} is {tokens.shape[0]} tokens and the fact's prompt {n}; "
            "restoring cell by cell needs prompts of the same token length (e.g. swap the subject for one "
            "of as many tokens)."
        )
    return record_run(model, tokens)


def trace_interventions(
    kind: str, window: int, n_layers: int, positions: Sequence[int], sever: str | None = None
) -> list[Intervention]:
    """The restorations of one grid, layer-major: for each layer, for each position, restore
    `kind` over the window around that layer (while `sever`'s outputs at the position stay
    corrupted in every layer)."""
    component = COMPONENT_OF_KIND[kind]
    out = []
    for layer in range(n_layers):
        layers = window_layers(layer, window, n_layers)  # window 1: the layer itself
        for pos in positions:
            restore = tuple(Site(component, l, pos) for l in layers)
            freeze = ()
            if sever is not None:
                freeze = tuple(Site(COMPONENT_OF_KIND[sever], l, pos) for l in range(n_layers))
            out.append(Intervention(restore, freeze))
    return out


@torch.no_grad()
def trace_prepared(
    model,
    prepared: PreparedFact,
    spec: Sequence[TraceSpec],
    *,
    noise: float,
    samples: int,
    seed: int,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    positions: Sequence[int] | None = None,
    base: RecordedRun | None = None,
) -> list[CausalTrace]:
    """One `CausalTrace` per (kind, window, sever) in `spec`, all from one corrupted run of
    `samples` rows. `positions`: the token positions to restore (default all); the other cells
    are NaN. `base`: the corrupted run to restore into (default: `corrupted_run`, the noise).
    Arguments are not checked here (see `causal_trace`)."""
    tf = prepared.tf
    corrupt = corrupted_run(model, prepared, noise=noise, samples=samples, seed=seed) if base is None else base
    metric = answer_probability(prepared.answer_id)
    n_layers, n_pos = model.cfg.n_layers, tf.n_tokens
    positions = list(range(n_pos)) if positions is None else list(positions)
    cells: list[Intervention] = []
    for kind, window, sever in spec:
        cells += trace_interventions(kind, window, n_layers, positions, sever)
    values = run_interventions(
        model, corrupt, prepared.clean, cells, metric, batch_size=batch_size,
        memory_budget=memory_budget, progress=progress,
    )
    p_corrupt = float(metric(corrupt.final_logits(model)).float().mean())
    traced = values.mean(dim=1).reshape(len(spec), n_layers, len(positions))
    per_kind = torch.full((len(spec), n_layers, n_pos), float("nan"), dtype=traced.dtype, device=traced.device)
    per_kind[:, :, positions] = traced
    return [
        CausalTrace(
            kind=kind, scores=per_kind[k].cpu(), p_clean=prepared.p_clean, p_corrupt=p_corrupt,
            str_tokens=tf.str_tokens, subject=tf.subject, answer=prepared.answer, answer_id=prepared.answer_id,
            correct=prepared.correct, window=window, noise=float(noise), samples=samples, seed=seed,
            sever=sever, fact=tf.fact,
        )
        for k, (kind, window, sever) in enumerate(spec)
    ]


def resolve_positions(prepared: PreparedFact, positions) -> list[int] | None:
    if positions is None:
        return None
    n_pos = prepared.tf.n_tokens
    if isinstance(positions, str):
        if positions != "subject_last":
            raise InvalidArgumentError(f"positions must be token indices or 'subject_last', got {positions!r}.")
        return [prepared.tf.subject.last]
    out = list(positions)
    if not out or any(isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n_pos for p in out):
        raise InvalidArgumentError(f"positions must be distinct token indices in [0, {n_pos}) for this prompt, got {positions!r}.")
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"positions repeat an index: {positions!r}.")
    return out


# --------------------------------------------------------------------------------------------
# Public API


def causal_trace(
    model,
    fact: Fact,
    *,
    kind: str = "resid",
    window: int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    sever: str | None = None,
    positions: Sequence[int] | str | None = None,
    corrupted: str | None = None,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
) -> CausalTrace:
    """Trace one fact: restore each (layer, token) of `kind` in the noise-corrupted runs.

    `kind`: "resid" (block outputs, one layer at a time), "mlp" or "attn" (outputs of the layers
    in a `window` around each layer; default `kvmem.config.default_window`: ROME's 10, or half
    the model when it has fewer layers). `noise`: the noise scale; None means
    `noise_level(model, [fact])` (3 x the std of this fact's subject embeddings; pass
    `noise_level(model, facts)` over a data set to match ROME). `sever="mlp"` / `"attn"` (with
    kind="resid") holds that sublayer's outputs at the restored token at their corrupted values.
    The answer is `fact.target_true`'s first token if given (`correct` says whether the model's top
    token agrees; a target of several tokens, or one the model does not predict by
    `kvmem.config.predicts`, gives a `KvmemWarning`), otherwise the model's top token. `positions`: restore only these token
    positions, or "subject_last" (the other cells of `scores` are NaN); the cost is proportional
    to the number of positions, so one column costs ~1/n_tokens of the full grid.
    `corrupted`: a corrupted prompt of the same token length to restore into instead of the
    noise (one run: `samples` and `noise` are not used; the trace records samples=1, noise=0).
    `batch_size`: rows per forward pass (None: as many as fit `memory_budget` bytes).
    `progress`: a progress bar (None: `kvmem.config.PROGRESS`).
    """
    check_trace_args(model, samples, noise, seed)
    if window is None and kind in KINDS:
        window = config.default_window(kind, model.cfg.n_layers)
    _check_kind(model, kind, window)
    if sever is not None:
        if sever not in ("mlp", "attn"):
            raise InvalidArgumentError(f"sever must be 'mlp', 'attn' or None, got {sever!r}.")
        if kind != "resid":
            raise InvalidArgumentError("Severed tracing restores the residual: use kind='resid' with sever=....")
        _check_kind(model, sever, 1)
    prepared = prepare_fact(model, fact)
    warn_target(model, prepared)
    positions = resolve_positions(prepared, positions)
    base = None
    if corrupted is not None:
        base = corrupted_prompt_run(model, prepared, corrupted)
        noise, samples = 0.0, 1
    if noise is None:
        noise = noise_level(model, [fact])
    (trace,) = trace_prepared(
        model, prepared, [(kind, window, sever)], noise=noise, samples=samples, seed=seed,
        batch_size=batch_size, memory_budget=memory_budget,
        progress=config.show_progress(progress), positions=positions, base=base,
    )
    return trace


def trace_all(
    model,
    fact: Fact,
    *,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
) -> TraceSet:
    """`causal_trace` for several kinds at once, sharing the clean and corrupted runs.

    `window` applies to "mlp" and "attn" (default `kvmem.config.default_window`: 10 on models of
    10 layers or more, as in ROME's figure 1); "resid" always restores one layer (as ROME does).
    Like `causal_trace`, warns (`KvmemWarning`) about a several-token or unpredicted target.
    """
    check_trace_args(model, samples, noise, seed)
    spec = kind_windows(model, kinds, window)
    prepared = prepare_fact(model, fact)
    warn_target(model, prepared)
    if noise is None:
        noise = noise_level(model, [fact])
    return TraceSet(tuple(trace_prepared(
        model, prepared, spec, noise=noise, samples=samples, seed=seed, batch_size=batch_size,
        memory_budget=memory_budget, progress=config.show_progress(progress),
    )))


__all__ = [
    "KINDS", "COMPONENT_OF_KIND", "Kind", "PreparedFact", "answer_probability", "causal_trace",
    "corrupted_prompt_run", "corrupted_run", "resolve_positions",
    "kind_windows", "noise_level", "prepare_fact", "trace_all", "trace_interventions", "trace_prepared",
    "window_layers",
]
