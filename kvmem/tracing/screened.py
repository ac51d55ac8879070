"""Exact causal tracing only where a gradient estimate points: the pre-screen.

An attribution estimate (`kvmem.tracing.attribution`) ranks the layers of a column better than it
gets their values or its top one: on 100 Gemma-3-270m facts the exact MLP peak is "eap-ig" (k=4)'s own
peak in 15% of facts at the last subject token and 33% at the last token, but among its 4 highest
layers in 55% and 85% (benchmarks/results/attribution/attribution_gemma-3-270m.md). So the screen
traces only those `top` cells of each requested column exactly, on the same noise rows as
`causal_trace`, and leaves the others NaN: every value it reports is an exact cell, and the cost is the
estimate's plus `top` of the column's `n_layers` exact cells. What that buys is measured in
docs/attribution.md (on Gemma it is little: the exact trace of a column is already cheap).
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvmem import config
from kvmem.core.engine import run_interventions
from kvmem.core.facts import Fact
from kvmem.errors import InvalidArgumentError
from kvmem.tracing.attribution import base_run, attribution_prepared, check_method, check_scale
from kvmem.tracing.results import CausalTrace
from kvmem.tracing.trace import (
    answer_probability,
    check_trace_args,
    kind_windows,
    prepare_fact,
    resolve_positions,
    trace_interventions,
    warn_target,
)

DEFAULT_TOP = 4  # Gemma-3-270m, eap-ig k=4: the exact MLP peak is among the estimate's top 4 in 55-85% of columns


def screened_trace(
    model,
    fact: Fact,
    *,
    kind: str = "mlp",
    method: str = "eap-ig",
    steps: int | None = None,
    top: int | None = None,
    window: int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    positions: Sequence[int] | str | None = "subject_last",
    corrupted: str | None = None,
    scale: str = "logprob",
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
) -> CausalTrace:
    """`causal_trace`'s exact cells where `method`'s estimate ranks a column's layers highest.

    For each column in `positions` ("subject_last" by default, token indices, or None for every
    token), the `top` layers (default `DEFAULT_TOP`, at most the model's) with the largest
    estimated indirect effect are traced exactly (the
    same noise samples as `causal_trace` with this `seed`, so each such cell equals the exact
    trace's); every other cell is NaN. `trace.scores` is therefore exact where it is not NaN, and a
    column's NaN-ignoring maximum is the exact peak whenever the estimate puts it in its top
    `top` (measured in docs/attribution.md). The other arguments are `attribution_trace`'s; the
    result's `method` names the screen, e.g. "eap-ig(k=4) -> exact top 4".
    """
    check_trace_args(model, samples, noise, seed)
    steps = check_method(method, steps)
    check_scale(scale)
    n_layers = int(model.cfg.n_layers)
    top = min(DEFAULT_TOP, n_layers) if top is None else top
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n_layers:
        raise InvalidArgumentError(f"top must be an int in [1, {n_layers}] (layers traced exactly per column), got {top!r}.")
    (spec,) = kind_windows(model, [kind], window)
    prepared = prepare_fact(model, fact)
    warn_target(model, prepared)
    cols = resolve_positions(prepared, positions)
    cols = list(range(prepared.tf.n_tokens)) if cols is None else cols
    base, noise, samples = base_run(model, prepared, corrupted, noise, samples, seed, [fact])
    (estimate,) = attribution_prepared(
        model, prepared, [spec], method=method, steps=steps, base=base, noise=noise, samples=samples, seed=seed,
        positions=cols, batch_size=batch_size, memory_budget=memory_budget, scale=scale,
    )
    kind, window, _ = spec
    chosen: list[tuple[int, int]] = []  # (layer, position), traced exactly
    cells = []
    for pos in cols:
        # trace_interventions is layer-major: one position gives one intervention per layer
        column = trace_interventions(kind, window, n_layers, [pos])
        ranked = torch.argsort(estimate.scores[:, pos].double(), descending=True, stable=True)[:top].tolist()
        for layer in sorted(ranked):
            chosen.append((layer, pos))
            cells.append(column[layer])
    metric = answer_probability(prepared.answer_id)
    values = run_interventions(model, base, prepared.clean, cells, metric, batch_size=batch_size,
                               memory_budget=memory_budget)
    scores = torch.full((n_layers, prepared.tf.n_tokens), float("nan"), dtype=torch.float32)
    for (layer, pos), v in zip(chosen, values.mean(dim=1).float().cpu()):
        scores[layer, pos] = v
    tf = prepared.tf
    return CausalTrace(
        kind=kind, scores=scores, p_clean=prepared.p_clean, p_corrupt=estimate.p_corrupt,
        str_tokens=tf.str_tokens, subject=tf.subject, answer=prepared.answer, answer_id=prepared.answer_id,
        correct=prepared.correct, window=window, noise=float(noise), samples=samples, seed=seed, sever=None,
        fact=tf.fact, method=f"{estimate.method} -> exact top {top}",
    )


__all__ = ["DEFAULT_TOP", "screened_trace"]
