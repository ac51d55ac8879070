"""Attribution tracing: every cell of a causal trace estimated from gradients, instead of one
patched run per cell.

A causal-trace cell (kind, layer l, position t) is the answer's probability `m` when the
corrupted run gets the clean value of `kind`'s output at position t in the window `W(l)` of layers
around l (`kvmem.tracing.trace`), averaged over the noise samples. With `Δ_j = clean_j - corrupt_j`
the change at site (j, t), the methods estimate `m(patched) - m(corrupt)`:

- "atp" (attribution patching, Nanda 2023): `Σ_{j∈W(l)} Δ_j · ∂m/∂a_j` at the corrupted run. One
  forward and one backward over the corrupted rows give every cell of every kind; a window is the
  sum of its layers' first-order terms (to first order, patching w sites at once is the sum).
- "atp*" (Kramár et al. 2024): AtP with GradDrop against cancellation. For each layer L, one more
  backward with the gradient through layer L's attention and MLP (their contributions to the
  residual stream) dropped; the cell's magnitude is the mean over L of the |estimate|, its sign
  AtP's. AtP*'s other fix, the QK fix, recomputes the attention softmax exactly when a *query or
  key* is patched; kvmem's kinds patch block outputs, attention outputs and MLP outputs, which sit
  after their layer's softmax, so the only softmaxes between a patch and the answer are later
  layers', which AtP* linearises too: the QK fix has nothing to apply to here.
- "ig" (integrated gradients of the patch): the joint patch of the window along the straight
  path `a(α) = corrupt + α Δ` on the window's sites, other states computed by the model, `steps`
  midpoint nodes: `Σ_j Δ_j · mean_α ∂m/∂a_j(α)`. By completeness it converges to the exact cell as
  `steps` grows; but it runs `steps` patched rows per cell with a backward, so it costs more than
  the exact trace (which runs one row per cell). It is the accurate reference, not the fast path.
- "eap-ig" (integrated gradients along the corruption, as EAP-IG, Hanna et al. 2024): the
  gradients at `steps` runs whose input (the residual entering layer 0) moves in a straight line
  from the corrupted to the clean run, averaged; then as AtP. `steps` forward/backward passes
  give every cell, like AtP; it does not converge to the exact cell (the path moves every state
  at once), but it reads gradients away from the corrupted point, where a saturated softmax at
  the answer flattens AtP's.

The metric is causal tracing's, the answer's probability p. The gradient methods linearise log p
by default (`scale="logprob"`; each noise row's estimated change of log p is mapped back to
`min(1, p_row * exp(change))`), or p itself (`scale="prob"`); "ig" converges on either scale.
A window's first order is taken as the sum of its layers' terms, which over-counts the paths from
an earlier restored layer through the later ones at the same token (the joint patch cuts them);
"ig" patches the window jointly. docs/attribution.md has the validation against exact traces.

All of them run on the engine's `forward_rows` (both backends), with gradients taken only with
respect to the added zero tensors (`torch.autograd.grad`), so no weight's gradient or flag changes.
Results are `CausalTrace`s (the same plots, views and frames as `causal_trace`), with
`method` saying how they were estimated.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from kvmem import config
from kvmem.core.engine import RecordedRun, RowGroup, forward_rows, rows_for_budget
from kvmem.core.facts import Fact
from kvmem.core.hooks import has_hook, restore_at
from kvmem.core.readout import final_logits
from kvmem.errors import InvalidArgumentError
from kvmem.tracing.results import CausalTrace, TraceSet
from kvmem.tracing.trace import (
    COMPONENT_OF_KIND,
    KINDS,
    PreparedFact,
    TraceSpec,
    answer_probability,
    check_trace_args,
    corrupted_prompt_run,
    corrupted_run,
    kind_windows,
    noise_level,
    prepare_fact,
    resolve_positions,
    warn_target,
    window_layers,
)

METHODS: tuple[str, ...] = ("atp", "atp*", "ig", "eap-ig")
# steps when none is given: the gradient methods' path resolution (see docs/attribution.md)
DEFAULT_STEPS = {"atp": 1, "atp*": 1, "ig": 16, "eap-ig": 4}
_HOOK = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


def check_method(method: str, steps: int | None) -> int:
    """The checked method's number of path steps (`DEFAULT_STEPS` when `steps` is None)."""
    if method not in METHODS:
        raise InvalidArgumentError(f"Unknown attribution method {method!r}; use one of {', '.join(METHODS)}.")
    if steps is None:
        return DEFAULT_STEPS[method]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an int >= 1, got {steps!r}.")
    if method in ("atp", "atp*") and steps != 1:
        raise InvalidArgumentError(f"{method} takes one gradient (steps=1); use method='ig' or 'eap-ig' for a path of {steps} steps.")
    return steps


SCALES: tuple[str, ...] = ("logprob", "prob")


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise InvalidArgumentError(f"scale must be 'logprob' (linearise log p, default) or 'prob', got {scale!r}.")


def method_label(method: str, steps: int) -> str:
    return method if method in ("atp", "atp*") else f"{method}(k={steps})"


def _nodes(steps: int, dtype, device) -> Tensor:
    """Midpoint nodes of [0, 1]: the path integral's rule (exact for a linear gradient)."""
    return ((torch.arange(steps, dtype=torch.float64) + 0.5) / steps).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Gradients of the metric at every site of a whole run (atp, atp*, eap-ig)


@contextmanager
def _grad_mode():
    with torch.enable_grad():
        yield


def _site_grads(
    model, base: RecordedRun, resid0: Tensor, metric, components: Sequence[str], *, drop_layers: bool = False
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """One forward of the rows `resid0` (the residual entering layer 0, `[row, pos, d_model]`)
    through the model, then the gradient of each row's metric with respect to every layer's
    `components` outputs at every position. Returns the rows' metric `[row]` and a list of
    gradient tables `{component: [layer, row, pos, d_model]}`: the plain gradient first and, with
    `drop_layers`, one per layer L with the gradient through layer L's attention and MLP dropped
    (GradDrop): L + 1 backward passes over one forward."""
    n_layers = model.cfg.n_layers
    rows = resid0.shape[0]
    deltas = {
        (c, l): torch.zeros_like(resid0, requires_grad=True) for c in components for l in range(n_layers)
    }
    dropped = {"layer": None}

    def add(delta):
        def hook(activation, hook=None):
            return activation + delta.to(activation.dtype)
        return hook

    def gate(layer, delta):
        # forward: the activation (plus its delta when it is a traced site); backward: no gradient
        # into the layer's own computation while `layer` is the dropped one
        def drop(grad):
            return torch.zeros_like(grad) if dropped["layer"] == layer else grad

        def hook(activation, hook=None):
            if activation.requires_grad:
                activation = activation.clone()
                activation.register_hook(drop)
            return activation if delta is None else activation + delta.to(activation.dtype)
        return hook

    hooks = []
    gated = ("attn_out", "mlp_out") if drop_layers else ()
    for l in range(n_layers):
        for c in set(components) | set(gated):
            name = f"blocks.{l}.{_HOOK[c]}"
            if not has_hook(model, name):
                continue
            delta = deltas.get((c, l))
            hooks.append((name, gate(l, delta) if c in gated else add(delta)))
    with _grad_mode():
        resid = forward_rows(model, base, [RowGroup(0, resid0, tuple(range(rows)))], 0, hooks)
        m = metric(final_logits(model, resid[:, -1]))
        order = list(deltas)
        tables = []
        passes = [None] + (list(range(n_layers)) if drop_layers else [])
        for k, layer in enumerate(passes):
            dropped["layer"] = layer
            grads = torch.autograd.grad(m.sum(), [deltas[o] for o in order], retain_graph=k < len(passes) - 1,
                                        allow_unused=True)
            table = {}
            for c in components:
                table[c] = torch.stack([
                    torch.zeros_like(resid0) if g is None else g
                    for (cc, _), g in zip(order, grads) if cc == c
                ]).detach()
            tables.append(table)
    return m.detach(), tables


def _first_order(grad: Tensor, base: RecordedRun, source: RecordedRun, component: str) -> Tensor:
    """`Δ · grad` per (layer, row, pos): each site's first-order effect on the metric."""
    n_layers = grad.shape[0]
    delta = torch.stack([
        source.activation(component, l).expand_as(base.activation(component, l)) - base.activation(component, l)
        for l in range(n_layers)
    ])
    return (delta.float() * grad.float()).sum(-1)


def _window_sum(site: Tensor, window: int) -> Tensor:
    """Per-site effects `[layer, row, pos]` summed over each layer's window: `[layer, row, pos]`."""
    n_layers = site.shape[0]
    return torch.stack([site[list(window_layers(l, window, n_layers))].sum(0) for l in range(n_layers)])


def answer_logprob(answer_id: int):
    """The log of `answer_probability`: the scale the gradient methods linearise by default."""

    def metric(logits: Tensor) -> Tensor:
        return logits.float().log_softmax(-1)[:, answer_id]

    return metric


def _scale_metric(prepared: PreparedFact, scale: str):
    """The metric the gradient methods linearise: p ("prob") or log p ("logprob")."""
    return answer_probability(prepared.answer_id) if scale == "prob" else answer_logprob(prepared.answer_id)


def _gradient_cells(
    model, prepared: PreparedFact, base: RecordedRun, spec: Sequence[TraceSpec], method: str, steps: int,
    scale: str, p_rows: Tensor,
) -> Tensor:
    """Cells `[spec, layer, pos]` (the change of the answer's probability, averaged over base rows)
    of "atp", "atp*" or "eap-ig". `scale` "logprob": each row's first-order change of log p,
    mapped back to a probability `min(1, p_row * exp(change))` (`p_rows`: the base rows' p);
    "prob": the first-order change of p."""
    metric = _scale_metric(prepared, scale)
    clean = prepared.clean
    components = sorted({COMPONENT_OF_KIND[kind] for kind, _, _ in spec})
    if method == "eap-ig":
        tables_sum: dict[str, Tensor] = {}
        r0, c0 = base.resid[0], clean.resid[0].expand_as(base.resid[0])
        for alpha in _nodes(steps, r0.dtype, r0.device):
            _, (table,) = _site_grads(model, base, r0 + alpha * (c0 - r0), metric, components)
            for c, g in table.items():
                tables_sum[c] = g if c not in tables_sum else tables_sum[c] + g
        tables = [{c: g / steps for c, g in tables_sum.items()}]
    else:
        _, tables = _site_grads(model, base, base.resid[0], metric, components, drop_layers=method == "atp*")
    p_rows = p_rows.float()[None, :, None]
    cells = []
    for kind, window, _ in spec:
        c = COMPONENT_OF_KIND[kind]
        # per (layer, row, pos): each row's estimated change of the metric
        estimates = [_window_sum(_first_order(t[c], base, clean, c), window) for t in tables]
        if method == "atp*":
            plain, dropped = estimates[0], torch.stack(estimates[1:])
            est = torch.where(plain < 0, -1.0, 1.0) * dropped.abs().mean(0)
        else:
            est = estimates[0]
        if scale == "logprob":
            est = (p_rows * est.double().exp()).clamp(max=1.0) - p_rows
        cells.append(est.mean(1))
    return torch.stack(cells)


# --------------------------------------------------------------------------------------------
# Integrated gradients of each cell's own patch (ig)


def _ig_cells(
    model, prepared: PreparedFact, base: RecordedRun, spec: Sequence[TraceSpec], steps: int,
    positions: Sequence[int], memory_budget: int, batch_size: int | None, scale: str, p_rows: Tensor,
) -> Tensor:
    """Cells `[spec, layer, pos]` of "ig": each cell's window patch integrated along its straight
    path, `steps` midpoint nodes, one patched row per (cell, base row, node), as the exact trace's
    rows (starting at the window's first layer and the cell's position)."""
    metric = _scale_metric(prepared, scale)
    clean = prepared.clean
    n_layers, n_pos, read = model.cfg.n_layers, base.n_pos, base.n_pos - 1
    dtype = base.resid.dtype
    alphas = _nodes(steps, dtype, base.resid.device)
    out = torch.zeros(len(spec), n_layers, n_pos, base.n_rows, dtype=torch.float64)
    # rows: (spec index, layer, pos, base row, node index), planned as the exact engine does
    rows_at: dict[int, list[tuple]] = defaultdict(list)
    for k, (kind, window, _) in enumerate(spec):
        comp = COMPONENT_OF_KIND[kind]
        for layer in range(n_layers):
            sites = list(window_layers(layer, window, n_layers))
            entry = sites[0] + 1 if comp == "resid_post" else sites[0]
            for pos in positions:
                for r in range(base.n_rows):
                    src = clean.n_rows == base.n_rows and r or 0
                    if all(bool((base.activation(comp, j)[r, pos] == clean.activation(comp, j)[src, pos]).all())
                           for j in sites):
                        continue  # nothing changes: the cell's effect is exactly 0 for this row
                    for a in range(steps):
                        rows_at[pos].append((k, layer, pos, r, a, entry))
    for t0 in sorted(rows_at):
        members = sorted(rows_at[t0], key=lambda x: (x[5], x[0], x[1], x[3], x[4]))
        limit = batch_size or max(1, rows_for_budget(model, n_pos - t0, memory_budget, with_grad=True))
        for lo in range(0, len(members), limit):
            chunk = members[lo : lo + limit]
            grads_delta = _ig_chunk(model, base, clean, spec, chunk, alphas, metric, t0, read)
            for (k, layer, pos, r, a, _), v in zip(chunk, grads_delta.tolist()):
                out[k, layer, pos, r] += v / steps
    if scale == "logprob":
        p_rows = p_rows.double().cpu()
        out = (p_rows * out.exp()).clamp(max=1.0) - p_rows
    return out.mean(-1)


def _ig_chunk(model, base, clean, spec, chunk, alphas, metric, t0: int, read: int) -> Tensor:
    """`Σ_j Δ_j · ∂m/∂a_j(α)` for each row of one chunk (same start position, sorted by layer)."""
    n_layers = model.cfg.n_layers
    leaves, deltas = [], []
    by_hook: dict[str, list[tuple[int, int, Tensor]]] = defaultdict(list)  # name -> (row, leaf index)
    entry_writes: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, (k, layer, pos, r, a, entry) in enumerate(chunk):
        kind, window, _ = spec[k]
        comp = COMPONENT_OF_KIND[kind]
        src = r if clean.n_rows == base.n_rows else 0
        for j in window_layers(layer, window, n_layers):
            b = base.activation(comp, j)[r, pos]
            d = clean.activation(comp, j)[src, pos] - b
            leaves.append((b + alphas[a] * d).detach())
            deltas.append((i, d))
            if comp == "resid_post":
                entry_writes[i].append((pos - t0, len(leaves) - 1))
            else:
                by_hook[f"blocks.{j}.{_HOOK[comp]}"].append((i, pos - t0, len(leaves) - 1))
    with _grad_mode():
        values = torch.stack(leaves).requires_grad_(True)
        hooks = [
            (name, restore_at(values[[x[2] for x in items]], [x[0] for x in items], [x[1] for x in items]))
            for name, items in by_hook.items()
        ]
        groups, lo = [], 0
        while lo < len(chunk):
            layer = chunk[lo][5]
            hi = lo
            while hi < len(chunk) and chunk[hi][5] == layer:
                hi += 1
            kv = [chunk[i][3] for i in range(lo, hi)]
            joining = base.resid[layer][torch.tensor(kv, device=base.resid.device), t0:]
            writes = [(i - lo, p, v) for i in range(lo, hi) for p, v in entry_writes.get(i, [])]
            if writes:
                rr = torch.tensor([w[0] for w in writes], device=joining.device)
                pp = torch.tensor([w[1] for w in writes], device=joining.device)
                joining = joining.index_put((rr, pp), values[[w[2] for w in writes]].to(joining.dtype))
            groups.append(RowGroup(layer, joining, tuple(kv)))
            lo = hi
        resid = forward_rows(model, base, groups, t0, hooks)
        m = metric(final_logits(model, resid[:, read - t0]))
        (g,) = torch.autograd.grad(m.sum(), [values])
    out = torch.zeros(len(chunk), dtype=torch.float64)
    for n, (i, d) in enumerate(deltas):
        out[i] += float((g[n].float() * d.float()).sum())
    return out


# --------------------------------------------------------------------------------------------
# Public API


def attribution_prepared(
    model,
    prepared: PreparedFact,
    spec: Sequence[TraceSpec],
    *,
    method: str,
    steps: int,
    base: RecordedRun,
    noise: float,
    samples: int,
    seed: int,
    positions: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    scale: str = "logprob",
) -> list[CausalTrace]:
    """`trace_prepared`'s traces estimated by `method` (checked arguments; `base` the corrupted
    run). Scores are `p_corrupt + estimated effect`; unrequested positions are NaN."""
    n_layers, n_pos = model.cfg.n_layers, prepared.tf.n_tokens
    cols = list(range(n_pos)) if positions is None else list(positions)
    with torch.no_grad():  # the corrupted run's logits, unembedded once per call
        p_rows = answer_probability(prepared.answer_id)(base.final_logits(model)).float()
    p_corrupt = float(p_rows.mean())
    if method == "ig":
        cells = _ig_cells(model, prepared, base, spec, steps, cols, memory_budget, batch_size, scale, p_rows)
    else:
        cells = _gradient_cells(model, prepared, base, spec, method, steps, scale, p_rows)
    scores = torch.full((len(spec), n_layers, n_pos), float("nan"), dtype=torch.float32)
    scores[:, :, cols] = (p_corrupt + cells.double()[:, :, cols]).float().cpu()
    tf = prepared.tf
    label = method_label(method, steps)
    return [
        CausalTrace(
            kind=kind, scores=scores[k], p_clean=prepared.p_clean, p_corrupt=p_corrupt,
            str_tokens=tf.str_tokens, subject=tf.subject, answer=prepared.answer, answer_id=prepared.answer_id,
            correct=prepared.correct, window=window, noise=float(noise), samples=samples, seed=seed,
            sever=None, fact=tf.fact, method=label,
        )
        for k, (kind, window, _) in enumerate(spec)
    ]


def base_run(model, prepared, corrupted, noise, samples, seed, facts):
    """The corrupted run an estimate starts from, with the noise and sample count it used: the
    user's corrupted prompt (one run, noise 0), else `samples` noised runs at `noise` (default
    `noise_level` over `facts`). Shared with `screened_trace`, whose exact cells reuse these rows."""
    if corrupted is not None:
        return corrupted_prompt_run(model, prepared, corrupted), 0.0, 1
    if noise is None:
        noise = noise_level(model, facts)
    return corrupted_run(model, prepared, noise=noise, samples=samples, seed=seed), float(noise), samples


def attribution_trace(
    model,
    fact: Fact,
    *,
    kind: str = "resid",
    method: str = "atp",
    steps: int | None = None,
    window: int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    positions: Sequence[int] | str | None = None,
    corrupted: str | None = None,
    scale: str = "logprob",
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
) -> CausalTrace:
    """`causal_trace`'s grid estimated from gradients (`method`: "atp", "atp*", "ig", "eap-ig";
    see the module's docstring). `steps`: the path's steps for "ig" and "eap-ig" (default
    `DEFAULT_STEPS`). The same kinds, windows, positions, noise (the same noise samples for the
    same `seed`, so cells compare one to one with `causal_trace`'s) and `corrupted` prompt as
    `causal_trace`. `scale`: linearise "logprob" (default) or "prob". Returns a `CausalTrace` whose
    `method` names the estimate. On ROME's corruption the fast methods only roughly agree with the
    exact trace (docs/attribution.md): use them to pre-screen."""
    check_trace_args(model, samples, noise, seed)
    steps = check_method(method, steps)
    check_scale(scale)
    (spec,) = kind_windows(model, [kind], window)
    prepared = prepare_fact(model, fact)
    warn_target(model, prepared)
    cols = resolve_positions(prepared, positions)
    base, noise, samples = base_run(model, prepared, corrupted, noise, samples, seed, [fact])
    (trace,) = attribution_prepared(
        model, prepared, [spec], method=method, steps=steps, base=base, noise=noise, samples=samples,
        seed=seed, positions=cols, batch_size=batch_size, memory_budget=memory_budget, scale=scale,
    )
    return trace


def attribution_trace_all(
    model,
    fact: Fact,
    *,
    method: str = "atp",
    steps: int | None = None,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    corrupted: str | None = None,
    scale: str = "logprob",
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
) -> TraceSet:
    """`trace_all` estimated by `method`: the gradient methods ("atp", "atp*", "eap-ig") get every
    kind from the same backward passes."""
    check_trace_args(model, samples, noise, seed)
    steps = check_method(method, steps)
    check_scale(scale)
    spec = kind_windows(model, kinds, window)
    prepared = prepare_fact(model, fact)
    warn_target(model, prepared)
    base, noise, samples = base_run(model, prepared, corrupted, noise, samples, seed, [fact])
    return TraceSet(tuple(attribution_prepared(
        model, prepared, spec, method=method, steps=steps, base=base, noise=noise, samples=samples, seed=seed,
        batch_size=batch_size, memory_budget=memory_budget, scale=scale,
    )))


__all__ = [
    "DEFAULT_STEPS", "METHODS", "attribution_prepared", "attribution_trace", "attribution_trace_all",
    "check_method", "method_label",
]
