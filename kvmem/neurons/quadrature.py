"""Riemann rules for integrated gradients: nodes `a_k` in [0, 1] and weights `w_k`.

`IG_i = (x_i - b_i) * sum_k w_k df/dh_i(h(a_k))` approximates the path integral over m = `steps`
intervals. With g(a) = f(h(a)) the error of sum_i IG_i against f(x) - f(b) is:

============  =================================  ===================================
rule          nodes                              error of sum_i IG_i vs f(x) - f(b)
============  =================================  ===================================
"midpoint"    (k + 1/2)/m, k = 0..m-1 (default)  <= max|g'''| / (24 m^2)
"left"        k/m, k = 0..m-1 (Dai et al.'s      <= max|g''| / (2 m)
              code: `baseline + step * i`)
"right"       k/m, k = 1..m                      <= max|g''| / (2 m)
"trapezoid"   k/m, k = 0..m (m + 1 nodes)        <= max|g'''| / (12 m^2)
"linspace"    linspace(0, 1, m), each weight 1/m  O(1/m), no clean bound (EleutherAI's
                                                 `knowledge-neurons`; includes a = 1)
"geometric"   midpoints of [0, a_min] and of      sum over intervals of
              m - 1 log-spaced intervals from     max|g''| w_k^3 / 24 (w_k: widths;
              a_min = 1e-6 to 1, weights = widths exact for linear g)
============  =================================  ===================================

The default `rule="auto"` is the midpoint rule (the same cost as Dai et al.'s left rule, with a
second-order error), or the geometric rule on models that normalise the MLP output; `rule="left"`
reproduces Dai et al.'s definition.

Models with a norm after the MLP (Gemma-2/3's `ln2_post`) need the geometric rule: the norm makes
the layer's output nearly scale-invariant, so g(a) is flat from a ~ 1e-2 to 1 and all of
f(x) - f(0) happens below that (an RMSNorm only stops normalising when a·‖out‖ nears sqrt(eps)),
where uniform nodes hardly look. Log-spaced nodes resolve it
(`benchmarks/results/neurons/neurons_speed_gemma-3-270m.md` compares the rules).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.weights import mlp_post_norm
from kvmem.errors import InvalidArgumentError

RULES: tuple[str, ...] = ("midpoint", "left", "right", "trapezoid", "linspace", "geometric")  # + "auto"
GEOMETRIC_MIN = 1e-6  # the geometric rule's smallest log-spaced node


def resolve_rule(model, rule: str, layers: Sequence[int] | None = None) -> str:
    """`rule`, with "auto" made concrete: "geometric" when any of `layers` (default all) normalises
    its MLP output (Gemma-2/3's `ln2_post`: the uniform path is degenerate there, module docstring),
    else "midpoint"."""
    if rule != "auto":
        return rule
    chosen = range(model.cfg.n_layers) if layers is None else layers
    return "geometric" if any(mlp_post_norm(model, l) is not None for l in chosen) else "midpoint"


def riemann_nodes(steps: int, rule: str = "midpoint") -> tuple[Float[Tensor, "node"], Float[Tensor, "node"]]:
    """Nodes `a_k` in [0, 1] and weights `w_k` of the rule (see the module docstring), float64."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1 (Dai et al. use 20), got {steps!r}.")
    if rule not in RULES:
        raise InvalidArgumentError(f"Unknown rule {rule!r}; use one of {', '.join(RULES)} or 'auto'.")
    m = steps
    k = torch.arange(m, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "left":
        return k / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "right":
        return (k + 1) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if rule == "trapezoid":
        w = torch.full((m + 1,), 1.0 / m, dtype=torch.float64)
        w[0] = w[-1] = 0.5 / m
        return torch.arange(m + 1, dtype=torch.float64) / m, w
    if rule == "geometric":
        if m < 2:
            raise InvalidArgumentError("rule='geometric' needs steps >= 2 (one node below a_min, the rest log-spaced).")
        # intervals [0, a_min], then m - 1 log-spaced up to 1; midpoint of each, weight its width
        lo = math.log(GEOMETRIC_MIN)
        edges = (lo * (1 - torch.arange(m, dtype=torch.float64) / (m - 1))).exp()
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), edges])
        edges[-1] = 1.0
        return (edges[:-1] + edges[1:]) / 2, edges[1:] - edges[:-1]
    # EleutherAI's knowledge-neurons: torch.linspace(0, 1, steps), gradients summed, times x / steps.
    nodes = torch.linspace(0, 1, m, dtype=torch.float64) if m > 1 else torch.zeros(1, dtype=torch.float64)
    return nodes, torch.full((m,), 1.0 / m, dtype=torch.float64)
