"""Values -> vocabulary: which tokens each value vector (row of `W_out`) promotes and demotes.

Geva et al. read value i of layer l as the distribution `softmax(W_out[i] @ W_U)`. The whole layer
is projected at once, in chunks of neurons so that at most `max_elements` logits exist at a time
(Gemma-3-270m: 2048 values x 262,144 tokens would be 2 GB; chunks of 128 neurons are 128 MB).
See `kvmem.memories._common` for how the final norm is handled (`final_norm="linear"`, default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem import config
from kvmem.core.weights import check_layer, mlp_weights
from kvmem.memories._common import (
    check_final_norm,
    check_k,
    decode_tokens,
    readout_logits,
    resolve_neurons,
    value_directions,
)
from kvmem.viz import HTMLView


@dataclass(frozen=True)
class ValueTokens:
    """Top-k promoted and demoted tokens of each value vector of one layer.

    Row j describes neuron `neurons[j]`. Scores are linearised logit changes per unit of
    coefficient (see `final_norm`); a memory with a negative coefficient promotes `bottom_ids`.
    """

    layer: int
    neurons: Int[Tensor, "neuron"] = field(repr=False)
    top_ids: Int[Tensor, "neuron k"] = field(repr=False)
    top_scores: Float[Tensor, "neuron k"] = field(repr=False)
    bottom_ids: Int[Tensor, "neuron k"] = field(repr=False)
    bottom_scores: Float[Tensor, "neuron k"] = field(repr=False)
    final_norm: str
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def row(self, neuron: int) -> int:
        hits = (self.neurons == int(neuron)).nonzero()
        if hits.numel() == 0:
            from kvmem.errors import InvalidArgumentError

            raise InvalidArgumentError(f"Neuron {neuron} is not in this result (layer {self.layer}).")
        return int(hits[0, 0])

    def tokens(self, neuron: int, which: str = "top") -> list[str]:
        ids = (self.top_ids if which == "top" else self.bottom_ids)[self.row(neuron)]
        return decode_tokens(self.tokenizer, ids.tolist())

    def to_frame(self, neurons: Sequence[int] | None = None):
        """One row per neuron: its top and bottom tokens (as lists) and their scores."""
        import pandas as pd

        rows = range(len(self.neurons)) if neurons is None else [self.row(n) for n in neurons]
        recs = []
        for j in rows:
            recs.append(
                {
                    "layer": self.layer,
                    "neuron": int(self.neurons[j]),
                    "top_tokens": decode_tokens(self.tokenizer, self.top_ids[j].tolist()),
                    "top_scores": [round(float(x), 4) for x in self.top_scores[j]],
                    "bottom_tokens": decode_tokens(self.tokenizer, self.bottom_ids[j].tolist()),
                    "bottom_scores": [round(float(x), 4) for x in self.bottom_scores[j]],
                }
            )
        return pd.DataFrame(recs)

    def show(self, *, neurons: Sequence[int] | None = None, n: int = 20) -> HTMLView:
        """An HTML table of top/bottom token lists of `neurons` (default: the result's first `n`)
        (plain HTML, no JavaScript, works offline)."""
        from kvmem.memories.views import value_tokens_html

        return value_tokens_html(self, neurons=neurons, n=n)


@torch.no_grad()
def value_tokens(
    model,
    layer: int,
    *,
    neurons: Sequence[int] | Int[Tensor, "neuron"] | None = None,
    k: int = 10,
    final_norm: str = "linear",
    max_elements: int = 2**25,
    progress: bool | None = None,
) -> ValueTokens:
    """For each value vector of `layer` (all of them by default), the k tokens it promotes most
    and the k it demotes most through the unembedding.

    `final_norm="linear"` (default) reads each value through the final norm's linear part:
    centred for LayerNorm models, times the norm's gain if it is not folded into `W_U`; the
    per-position 1/scale, `b_U` and soft-capping change no ranking and are left out.
    `final_norm="none"` uses `v @ model.W_U` as is (note `W_U` already carries the final norm's
    gain when the model was loaded with fold_ln). Blocks with a post-MLP norm (Gemma 2/3) write
    `W_out[i]` times that norm's gain: values are read that way (`value_directions`).
    `max_elements` bounds the logits held at once. `progress`: None means `kvmem.config.PROGRESS`.
    """
    layer = check_layer(model, layer)
    k = check_k(k)
    check_final_norm(final_norm)
    idx = resolve_neurons(model, neurons)
    d_vocab = model.W_U.shape[1]
    k = min(k, d_vocab)
    W_out = mlp_weights(model, layer).W_out
    chunk = max(1, int(max_elements) // d_vocab)
    tops, top_s, bots, bot_s = [], [], [], []
    show_bar = config.show_progress(progress)
    for start in tqdm(range(0, len(idx), chunk), disable=not show_bar, desc=f"values L{layer}"):
        sel = idx[start : start + chunk].to(W_out.device)
        logits = readout_logits(model, value_directions(model, layer, W_out[sel]), final_norm).float()
        s, i = logits.topk(k, dim=-1)
        tops.append(i.cpu())
        top_s.append(s.cpu())
        s, i = logits.topk(k, dim=-1, largest=False)
        bots.append(i.cpu())
        bot_s.append(s.cpu())
        del logits
    tok = getattr(model, "tokenizer", None)
    return ValueTokens(
        layer=layer,
        neurons=idx,
        top_ids=torch.cat(tops),
        top_scores=torch.cat(top_s),
        bottom_ids=torch.cat(bots),
        bottom_scores=torch.cat(bot_s),
        final_norm=final_norm,
        tokenizer=tok,
    )
