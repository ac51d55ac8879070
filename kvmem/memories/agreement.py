"""Key-value agreement (Geva et al. 2021, section 5).

For each memory, compare the token its value promotes most with the token that follows its key's
top-triggering prefix. Geva et al. report the agreement rate rising to ~3.5% in the upper layers of
their 16-layer model, against 1/|V| (0.0004%) for a random token.

Two baselines are reported: the uniform one (1/|V|) and a stronger, shuffled one (each key paired
with the value of another random memory of the same layer; this keeps the token frequencies of both
sides and so is the chance level to beat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.errors import InvalidArgumentError
from kvmem.memories._common import check_k
from kvmem.memories.contexts import TopContexts
from kvmem.memories.values import ValueTokens, value_tokens


@dataclass(frozen=True)
class Agreement:
    """Per layer: agreement rates between keys' top triggers' next tokens and values' top tokens.

    - `agreement`: top-1 trigger's next token == value's top-1 token (Geva et al.'s measure);
    - `agreement_all`: the same over all (memory, trigger) pairs of the top-k triggers;
    - `in_value_topk`: top-1 trigger's next token among the value's top `k_values` tokens;
    - `shuffled`, `shuffled_in_topk`: the first and third with values paired to random keys;
    - `uniform`: 1 / d_vocab; `n_memories`: memories with a trigger and a known next token.
    """

    layers: tuple[int, ...]
    agreement: Float[Tensor, "layer"] = field(repr=False)
    agreement_all: Float[Tensor, "layer"] = field(repr=False)
    in_value_topk: Float[Tensor, "layer"] = field(repr=False)
    shuffled: Float[Tensor, "layer"] = field(repr=False)
    shuffled_in_topk: Float[Tensor, "layer"] = field(repr=False)
    uniform: float
    n_memories: Int[Tensor, "layer"] = field(repr=False)
    k_values: int
    n_tokens: int

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "agreement": self.agreement.tolist(),
                "agreement_all_triggers": self.agreement_all.tolist(),
                f"in_value_top{self.k_values}": self.in_value_topk.tolist(),
                "shuffled": self.shuffled.tolist(),
                f"shuffled_in_top{self.k_values}": self.shuffled_in_topk.tolist(),
                "uniform": [self.uniform] * len(self.layers),
                "n_memories": self.n_memories.tolist(),
            }
        )

    def plot(self, ax=None, *, title: str | None = None):
        """Agreement by layer against the shuffled and uniform baselines."""
        from kvmem.memories.views import plot_agreement

        return plot_agreement(self, ax, title=title)


def _as_map(items, what: str) -> dict:
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, (TopContexts, ValueTokens)):
        return {items.layer: items}
    try:
        return {x.layer: x for x in items}
    except (TypeError, AttributeError):
        raise InvalidArgumentError(f"{what} must be a dict layer -> result, or a list of results.") from None


def key_value_agreement(
    model,
    contexts: Mapping[int, TopContexts] | Sequence[TopContexts] | TopContexts,
    values: Mapping[int, ValueTokens] | Sequence[ValueTokens] | ValueTokens | None = None,
    *,
    k_values: int = 10,
    final_norm: str = "linear",
    n_shuffles: int = 20,
    seed: int = 0,
    progress: bool | None = None,
) -> Agreement:
    """Agreement of keys and values per layer (see `Agreement`), with shuffled and uniform baselines.

    `contexts` comes from `top_contexts` / `top_contexts_by_layer`. `values` (from `value_tokens`
    with at least `k_values` tokens) is computed when not given (`progress`: its bar; None means
    `kvmem.config.PROGRESS`).
    """
    k_values = check_k(k_values, "k_values")
    check_k(n_shuffles, "n_shuffles")
    ctx = _as_map(contexts, "contexts")
    if not ctx:
        raise InvalidArgumentError("contexts is empty; pass the result of top_contexts_by_layer(...).")
    vals = {} if values is None else _as_map(values, "values")
    gen = torch.Generator().manual_seed(seed)
    layers = tuple(sorted(ctx))
    out = {n: [] for n in ("agr", "all", "topk", "shuf", "shuf_topk", "n")}
    n_tokens = 0
    for layer in layers:
        tc = ctx[layer]
        n_tokens = max(n_tokens, tc.n_tokens)
        vt = vals.get(layer)
        if vt is None:
            vt = value_tokens(model, layer, neurons=tc.neurons, k=k_values, final_norm=final_norm, progress=progress)
        if vt.top_ids.shape[1] < k_values:
            raise InvalidArgumentError(
                f"values for layer {layer} hold {vt.top_ids.shape[1]} tokens per value; need k_values={k_values}."
            )
        pos_of = {int(nrn): j for j, nrn in enumerate(vt.neurons.tolist())}
        missing = [int(n) for n in tc.neurons.tolist() if int(n) not in pos_of]
        if missing:
            raise InvalidArgumentError(f"values for layer {layer} lack neurons {missing[:5]}; compute them for the same neurons.")
        vrow = torch.tensor([pos_of[int(n)] for n in tc.neurons.tolist()], dtype=torch.long)
        top1 = vt.top_ids[vrow, 0]
        topk = vt.top_ids[vrow, :k_values]
        nxt = tc.next_tokens
        ok_all = torch.isfinite(tc.coefficients) & (nxt >= 0)
        ok = ok_all[:, 0]
        n = int(ok.sum())
        out["n"].append(n)
        if n == 0:
            for key in ("agr", "all", "topk", "shuf", "shuf_topk"):
                out[key].append(float("nan"))
            continue
        nx1 = nxt[:, 0]
        out["agr"].append(float(((top1 == nx1) & ok).sum()) / n)
        out["all"].append(float(((top1[:, None] == nxt) & ok_all).sum()) / max(1, int(ok_all.sum())))
        out["topk"].append(float(((topk == nx1[:, None]).any(1) & ok).sum()) / n)
        s1 = st = 0.0
        for _ in range(n_shuffles):
            perm = torch.randperm(len(vrow), generator=gen)
            s1 += float(((top1[perm] == nx1) & ok).sum()) / n
            st += float(((topk[perm] == nx1[:, None]).any(1) & ok).sum()) / n
        out["shuf"].append(s1 / n_shuffles)
        out["shuf_topk"].append(st / n_shuffles)
    f = lambda key: torch.tensor(out[key], dtype=torch.float64)  # noqa: E731
    return Agreement(
        layers=layers,
        agreement=f("agr"),
        agreement_all=f("all"),
        in_value_topk=f("topk"),
        shuffled=f("shuf"),
        shuffled_in_topk=f("shuf_topk"),
        uniform=1.0 / model.W_U.shape[1],
        n_memories=torch.tensor(out["n"], dtype=torch.long),
        k_values=k_values,
        n_tokens=n_tokens,
    )
