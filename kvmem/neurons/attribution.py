"""Integrated gradients on MLP neurons (Dai et al., ACL 2022, "Knowledge Neurons").

Definitions
-----------
- Objective f: p(gold target | prompt), teacher-forced, product over target tokens
  (`kvmem.neurons.objective`).
- Neurons: `blocks.{l}.mlp.hook_post` (the key coefficients, gated product included) at the last
  prompt position. `site="pre"` uses `hook_pre` instead (the pre-activation; what the EleutherAI
  `knowledge-neurons` package patches on GPT-2, `mlp.c_fc`'s output).
- For layer l, the path `h(a) = b + a (x - b)` from the baseline `b` (zeros by default) to the
  actual activation `x` of that layer's neurons at the last position, all other layers left to
  compute normally; `IG_i = (x_i - b_i) * sum_k w_k df/dh_i(h(a_k))` with the nodes and weights of
  a Riemann rule (`kvmem.neurons.quadrature`). Completeness: `sum_i IG_i ~= f(x) - f(b)` for every
  layer, up to the rule's quadrature error.

How it is computed
------------------
All layers and all nodes of one prompt in as few batched forward/backward passes as memory allows
(usually one), on the engine tracing uses (`kvmem.core.engine.forward_rows`). The clean run is
recorded once; row (l, a) scales layer l only, at the last prompt position P, so:

- it starts at layer l from the clean run's residual (layers < l are clean), and joins the batch
  there: block j runs once, with exactly the rows that need it;
- it runs only the positions from P on (one position for a one-token target), attending to the
  clean run's keys/values of earlier positions;
- only the positions that predict target tokens are unembedded;
- one backward pass gives every row's gradient (rows are independent, so the gradient of the sum
  of their objectives is each row's own gradient).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kvmem import config
from kvmem.core.engine import RowGroup, forward_rows, record_run, rows_for_budget
from kvmem.core.facts import Fact
from kvmem.core.hooks import capture, restore_at
from kvmem.core.weights import check_layers
from kvmem.errors import InvalidArgumentError
from kvmem.neurons.objective import TeacherForced, gold_logprob, teacher_forced
from kvmem.neurons.quadrature import resolve_rule, riemann_nodes
from kvmem.neurons.results import NeuronAttribution

SITES: tuple[str, ...] = ("post", "pre")


def site_hook(layer: int, site: str) -> str:
    """The hook point of layer `layer`'s neurons: `hook_post` (site "post") or `hook_pre` ("pre")."""
    if site not in SITES:
        raise InvalidArgumentError(f"site must be 'post' (hook_post, default) or 'pre' (hook_pre), got {site!r}.")
    return f"blocks.{layer}.mlp.hook_{site}"


def nodes_per_pass(
    model, n_layers: int, n_positions: int, n_nodes: int, batch_size: int | None, memory_budget: int
) -> int:
    """Riemann nodes per forward/backward pass: each node is one row per attributed layer, so a
    pass holds `nodes x n_layers` rows (at least one node of every layer)."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}.")
        rows = batch_size
    else:
        rows = rows_for_budget(model, n_positions, memory_budget, with_grad=True)
    return max(1, min(n_nodes, rows // n_layers))


def _baseline(baseline: str | Tensor, x: Tensor) -> Tensor:
    if isinstance(baseline, str):
        if baseline != "zero":
            raise InvalidArgumentError(f"baseline must be 'zero' or a [layer, d_mlp] tensor, got {baseline!r}.")
        return torch.zeros_like(x)
    if not isinstance(baseline, Tensor) or tuple(baseline.shape) != tuple(x.shape):
        raise InvalidArgumentError(
            f"baseline tensor must have shape {tuple(x.shape)} ([len(layers), d_mlp]), "
            f"got {tuple(getattr(baseline, 'shape', ()))}."
        )
    return baseline.to(device=x.device, dtype=x.dtype)


def attribute(
    model,
    tf: TeacherForced,
    layers: list[int],
    *,
    steps: int,
    baseline: str | Tensor,
    rule: str,
    site: str,
    batch_size: int | None,
    memory_budget: int,
    progress: bool,
) -> NeuronAttribution:
    """Integrated gradients of one tokenized prompt (`layers` checked, `rule` resolved)."""
    nodes, weights = riemann_nodes(steps, rule)
    names = [site_hook(l, site) for l in layers]
    P = tf.last_pos
    kept: dict = {}
    run = record_run(model, tf.tokens, fwd_hooks=[(n, capture(kept, n)) for n in names])
    x = torch.stack([kept[n][0, P] for n in names])  # [layer, d_mlp]
    b = _baseline(baseline, x)
    target = torch.tensor(tf.target_ids, device=x.device)
    with torch.no_grad():
        prob = float(gold_logprob(model, run.resid[-1][:, P:], target).exp()[0])

    # Nodes, plus a = 0 when the rule lacks it, so f(baseline) comes for free.
    has_zero = bool((nodes == 0).any())
    all_nodes = nodes if has_zero else torch.cat([nodes, torch.zeros(1, dtype=nodes.dtype)])
    n_nodes = len(all_nodes)
    per_pass = nodes_per_pass(model, len(layers), len(tf.target_ids), n_nodes, batch_size, memory_budget)
    grads = torch.zeros(len(layers), n_nodes, x.shape[-1], dtype=torch.float64)
    probs = torch.zeros(len(layers), n_nodes, dtype=torch.float64)
    chunks = [list(range(i, min(i + per_pass, n_nodes))) for i in range(0, n_nodes, per_pass)]
    for chunk in tqdm(chunks, disable=not progress, desc="integrated gradients"):
        c = len(chunk)
        alpha = all_nodes[chunk].to(device=x.device, dtype=x.dtype)[:, None]  # [c, 1]
        hs = [(b[i] + alpha * (x[i] - b[i])).detach().requires_grad_(True) for i in range(len(layers))]
        # rows i*c .. (i+1)*c scale layer layers[i]; they enter there with the clean residual
        # (broadcast, not copied) and continue the clean run's prefix
        groups = [RowGroup(l, run.resid[l][:, P:].expand(c, -1, -1), (0,) * c) for l in layers]
        hooks = [(n, restore_at(hs[i], range(i * c, (i + 1) * c), [0] * c)) for i, n in enumerate(names)]
        resid = forward_rows(model, run, groups, P, hooks)
        p_rows = gold_logprob(model, resid, target).exp()
        g = torch.autograd.grad(p_rows.sum(), hs)
        for i in range(len(layers)):
            grads[i, chunk] = g[i].detach().double().cpu()
            probs[i, chunk] = p_rows[i * c : (i + 1) * c].detach().double().cpu()
    w = weights.to(grads.dtype)
    integral = torch.einsum("lkd,k->ld", grads[:, : len(nodes)], w)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    scores = ((x - b).double().cpu() * integral).to(out_dtype)
    zero_col = int(torch.nonzero(all_nodes == 0)[0])
    return NeuronAttribution(
        prompt=tf.prompt,
        target=tf.target,
        str_tokens=tf.str_tokens,
        target_ids=tf.target_ids,
        layers=tuple(layers),
        scores=scores,
        activations=x.detach().cpu().to(out_dtype),
        baseline=b.detach().cpu().to(out_dtype),
        prob=prob,
        baseline_probs=probs[:, zero_col].to(out_dtype),
        steps=steps,
        rule=rule,
        site=site,
    )


def integrated_gradients(
    model,
    fact: Fact | str,
    target: str | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    baseline: str | Float[Tensor, "layer d_mlp"] = "zero",
    rule: str = "auto",
    site: str = "post",
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    prepend_bos: bool | None = None,
    progress: bool | None = None,
) -> NeuronAttribution:
    """Integrated gradients of p(gold target | prompt) w.r.t. each MLP neuron at the last prompt position.

    `fact`: a `Fact` (its prompt and `target_true`) or a prompt string with `target`.
    `layers`: None for all (or an int / list); `steps`: m, the number of Riemann intervals;
    `baseline`: "zero" (Dai et al.) or a `[len(layers), d_mlp]` tensor; `rule`: "auto" (default:
    "geometric" on models that normalise the MLP output, like Gemma-3, else "midpoint"), "midpoint",
    "left" (Dai et al.), "right", "trapezoid", "linspace" (EleutherAI) or "geometric"; `site`:
    "post" (hook_post, default) or "pre" (hook_pre); `batch_size`: rows (layer x node pairs) per
    forward/backward pass (None: as many as fit `memory_budget` bytes); `progress`: a progress bar
    (None: `kvmem.config.PROGRESS`). Multi-token targets are teacher-forced with the gold tokens and
    scored by the product of their probabilities. See the module docstring for the definitions.
    """
    tf = teacher_forced(model, fact, target, prepend_bos=prepend_bos)
    chosen = check_layers(model, layers)
    rule = resolve_rule(model, rule, chosen)
    riemann_nodes(steps, rule)  # validate early
    return attribute(
        model, tf, chosen, steps=steps, baseline=baseline, rule=rule, site=site, batch_size=batch_size,
        memory_budget=memory_budget, progress=config.show_progress(progress),
    )
