"""Fact view: which memories push a fact's answer, at the subject's last token and the last token.

For memory i of layer l at position p, the push toward the gold token g is its direct logit
attribution through the value: `c_i(l, p) * (read(W_out[i]) . W_U[:, g]) / s(p)`, where `read`
is the final norm's linear part (centring for LayerNorm, its gain if not folded into `W_U`) and
`s(p)` is the final norm's actual scale at position p in this run. At the last position this is
exactly the memory's direct effect on the answer's logit (the sum over memories is the MLP's
direct logit attribution, `b_out` excluded). Where the block normalises its MLP output (Gemma
2/3's `ln2_post`), the value is read through that norm's gain and divided by its actual scale at
p too, so the attribution stays exact. At the subject position it is the same logit-lens
reading: what the memory writes there, read as if it were the prediction (it reaches the answer
only through later attention). The (layer, neuron) pairs are the units knowledge neurons and
causal tracing (MLP at the subject's last token) talk about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.errors import InvalidArgumentError
from kvmem.memories._common import (
    check_final_norm,
    check_k,
    decode_tokens,
    readout_logits,
    unembed_column,
    value_directions,
)
from kvmem.core.facts import Fact, tokenize_fact
from kvmem.core.weights import check_layers, final_scale_name, hook_post_name, post_norm_scale_name
from kvmem.viz import HTMLView

POSITION_LABELS = ("subject_last", "last")


@dataclass(frozen=True)
class FactMemories:
    """Per layer and position (`positions`: subject's last token, last token), the k memories
    whose coefficient x value pushes the gold token most.

    `total[l, p]` is the sum over all memories of layer l (the MLP's direct push, `b_out`
    excluded); `value_top_ids` are each chosen memory's value's top tokens, sign-adjusted
    (bottom tokens where the coefficient is negative).
    """

    fact: Fact
    str_tokens: tuple[str, ...]
    target_id: int
    target: str
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    neurons: Int[Tensor, "layer position k"] = field(repr=False)
    coefficients: Float[Tensor, "layer position k"] = field(repr=False)
    push: Float[Tensor, "layer position k"] = field(repr=False)
    total: Float[Tensor, "layer position"] = field(repr=False)
    value_top_ids: Int[Tensor, "layer position k n_tokens"] = field(repr=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def top_memories(self, n: int | None = None, position: str = "subject_last") -> list[tuple[int, int, float]]:
        """(layer, neuron, push) of the strongest memories over all layers at one position."""
        p = POSITION_LABELS.index(position)
        flat = [
            (self.layers[li], int(self.neurons[li, p, j]), float(self.push[li, p, j]))
            for li in range(len(self.layers))
            for j in range(self.neurons.shape[2])
        ]
        flat.sort(key=lambda t: -t[2])
        return flat[:n] if n is not None else flat

    def to_frame(self):
        import pandas as pd

        recs = []
        for li, layer in enumerate(self.layers):
            for p, label in enumerate(POSITION_LABELS):
                for j in range(self.neurons.shape[2]):
                    recs.append(
                        {
                            "layer": layer,
                            "position": label,
                            "token": self.str_tokens[self.positions[p]],
                            "rank": j,
                            "neuron": int(self.neurons[li, p, j]),
                            "coefficient": float(self.coefficients[li, p, j]),
                            "push": float(self.push[li, p, j]),
                            "layer_total": float(self.total[li, p]),
                            "value_tokens": decode_tokens(self.tokenizer, self.value_top_ids[li, p, j].tolist()),
                        }
                    )
        return pd.DataFrame(recs)

    def plot(self, ax=None, *, title: str | None = None):
        """Each layer's MLP push toward the answer at the two positions."""
        from kvmem.memories.views import plot_fact_memories

        return plot_fact_memories(self, ax, title=title)

    def show(self, *, n: int = 10) -> HTMLView:
        """The `n` strongest memories at each position, with the tokens their values promote."""
        from kvmem.memories.views import fact_memories_html

        return fact_memories_html(self, n=n)


@torch.no_grad()
def fact_memories(
    model,
    fact: Fact,
    layers: Sequence[int] | int | None = None,
    *,
    k: int = 10,
    target: str = "true",
    n_tokens: int = 5,
    final_norm: str = "linear",
) -> FactMemories:
    """The memories at the subject's last token and the last token that push `fact`'s answer
    (its first token) most, by layer; see the module docstring for the measure."""
    if not isinstance(fact, Fact):
        raise InvalidArgumentError(f"Expected a kvmem.Fact, got {type(fact).__name__}.")
    layers = check_layers(model, layers)
    k = min(check_k(k), model.cfg.d_mlp)
    n_tokens = check_k(n_tokens, "n_tokens")
    check_final_norm(final_norm)
    tf = tokenize_fact(model, fact, target=target)
    gold = int(tf.target_ids[0])
    positions = (tf.subject.last, tf.last_pos)
    device = model.W_U.device
    names = [hook_post_name(model, l) for l in layers]
    scale_name = final_scale_name(model) if final_norm == "linear" else None
    post_names = {l: post_norm_scale_name(model, l) for l in layers}
    keep = set(names) | ({scale_name} if scale_name else set()) | {n for n in post_names.values() if n}
    _, cache = model.run_with_cache(tf.tokens[None].to(device), names_filter=lambda n: n in keep)
    pos = torch.tensor(positions, device=device)
    if scale_name is not None:
        scale = cache[scale_name][0, pos].reshape(len(positions)).float()  # (position,)
    else:
        scale = torch.ones(len(positions), device=device)
    r = unembed_column(model, gold, final_norm)
    neurons, coefs, pushes, totals, vtop = [], [], [], [], []
    for l, name in zip(layers, names):
        W = value_directions(model, l)
        per_unit = (W @ r.to(W.dtype)).float()  # (d_mlp,)
        c = cache[name][0, pos].float()  # (position, d_mlp)
        s = scale
        if post_names[l] is not None:  # the post-MLP norm's 1/scale, shared by the layer's memories
            s = s * cache[post_names[l]][0, pos].reshape(len(positions)).float()
        push = c * per_unit[None, :] / s[:, None]
        v, i = push.topk(k, dim=-1)
        neurons.append(i)
        pushes.append(v)
        coefs.append(c.gather(1, i))
        totals.append(push.sum(-1))
        logits = readout_logits(model, W[i.reshape(-1)], final_norm).float()
        sign = torch.sign(c.gather(1, i)).reshape(-1, 1)
        sign[sign == 0] = 1
        vtop.append((logits * sign).topk(n_tokens, dim=-1).indices.reshape(len(positions), k, n_tokens))
    tok = model.tokenizer
    return FactMemories(
        fact=fact,
        str_tokens=tf.str_tokens,
        target_id=gold,
        target=tok.decode([gold]),
        layers=tuple(layers),
        positions=positions,
        neurons=torch.stack(neurons).cpu(),
        coefficients=torch.stack(coefs).cpu(),
        push=torch.stack(pushes).cpu(),
        total=torch.stack(totals).cpu(),
        value_top_ids=torch.stack(vtop).cpu(),
        tokenizer=tok,
    )
