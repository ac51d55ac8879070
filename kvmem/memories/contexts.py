"""Keys -> top contexts: stream a corpus and keep, for every neuron, the k prefixes it fires on most.

Streaming. The corpus is read as fixed-length windows (`kvmem.memories.windows`, each starting
with the model's start token). The forward stops right after the deepest requested layer
(`stop_at_layer`): no later block, no final norm, no unembedding. For each batch of windows and each layer, `hook_post` is reduced to a
batch top-k per neuron and merged into a running top-k (`torch.topk` over old ∪ new); only neurons
whose batch best beats their current k-th best are merged. The state is `neurons x k` scores plus
the `context` tokens ending at each trigger: its size depends on the model, k and `context`, never
on the corpus size.

Candidate positions are real text tokens: the start token and separators (where models park huge
activations) and padding are never triggers. The next token of a trigger is read across window
boundaries (it is -1 only at the very end of the corpus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import run_to_layer
from kvmem import config
from kvmem.core.hooks import capture
from kvmem.core.weights import check_layers, check_layer, hook_post_name
from kvmem.errors import InvalidArgumentError
from kvmem.memories._common import check_k, decode_tokens, resolve_neurons
from kvmem.memories.windows import Corpus, WindowBatch, corpus_windows, special_ids
from kvmem.viz import HTMLView


# --- running top-k ----------------------------------------------------------------------------


class RunningTopK:
    """Per-neuron top-k of activations seen so far, with each trigger's context; bounded memory."""

    def __init__(self, n: int, k: int, context: int, device: torch.device | str = "cpu"):
        self.k, self.context = k, context
        self.values = torch.full((n, k), float("-inf"), device=device)
        self.rows = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.positions = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.contexts = torch.full((n, k, context), -1, dtype=torch.int32, device=device)
        self.next_tokens = torch.full((n, k), -1, dtype=torch.int32, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.rows, self.positions, self.contexts, self.next_tokens))

    @torch.no_grad()
    def update(self, acts: Float[Tensor, "neuron n"], batch: WindowBatch) -> None:
        """Merge `acts` (neurons x flattened batch positions; invalid positions already -inf)."""
        k, C = self.k, self.context
        B, T = batch.tokens.shape
        kk = min(k, acts.shape[1])
        cv, ci = acts.topk(kk, dim=1)
        improve = cv[:, 0] > self.values[:, -1]
        if not bool(improve.any()):
            return
        r = improve.nonzero()[:, 0]
        cv, ci = cv[r], ci[r]
        sv, si = torch.cat([self.values[r], cv], dim=1).topk(k, dim=1)
        from_new = si >= k
        flat = ci.gather(1, (si - k).clamp(min=0))
        b, t = flat // T, flat % T
        old = si.clamp(max=k - 1)
        dev = self.values.device
        tokens = batch.tokens.to(dev)
        nexts = batch.next_tokens.to(dev)
        p = t[..., None] - C + 1 + torch.arange(C, device=dev)
        ctx_new = tokens[b[..., None], p.clamp(min=0)]
        ctx_new = torch.where(p >= 0, ctx_new, -1).to(torch.int32)
        ctx_old = self.contexts[r].gather(1, old[..., None].expand(-1, -1, C))
        self.contexts[r] = torch.where(from_new[..., None], ctx_new, ctx_old)
        self.next_tokens[r] = torch.where(from_new, nexts[b, t].to(torch.int32), self.next_tokens[r].gather(1, old))
        self.rows[r] = torch.where(from_new, b + batch.first_row, self.rows[r].gather(1, old))
        self.positions[r] = torch.where(from_new, t, self.positions[r].gather(1, old))
        self.values[r] = sv
        missing = torch.isinf(self.values) & (self.values < 0)
        if bool(missing.any()):
            self.rows[missing] = -1
            self.positions[missing] = -1
            self.next_tokens[missing] = -1
            self.contexts[missing] = -1


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopContexts:
    """The k highest-coefficient prefixes of each neuron of one layer over a corpus.

    Row j is neuron `neurons[j]`; slot 0 is its highest trigger. `contexts[j, s]` holds the token
    ids that end at the trigger token (right-aligned, -1 padding on the left; up to `context`
    tokens of the window the model saw, start token included). `next_tokens` is the corpus's
    token after the trigger. Slots never filled (corpus shorter than k) have coefficient -inf.
    """

    layer: int
    neurons: Int[Tensor, "neuron"] = field(repr=False)
    coefficients: Float[Tensor, "neuron k"] = field(repr=False)
    contexts: Int[Tensor, "neuron k context"] = field(repr=False)
    next_tokens: Int[Tensor, "neuron k"] = field(repr=False)
    rows: Int[Tensor, "neuron k"] = field(repr=False)
    positions: Int[Tensor, "neuron k"] = field(repr=False)
    n_tokens: int
    window: int
    special_ids: tuple[int, ...] = ()
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def k(self) -> int:
        return int(self.coefficients.shape[1])

    @property
    def trigger_ids(self) -> Int[Tensor, "neuron k"]:
        return self.contexts[:, :, -1]

    def row(self, neuron: int) -> int:
        hits = (self.neurons == int(neuron)).nonzero()
        if hits.numel() == 0:
            raise InvalidArgumentError(f"Neuron {neuron} is not in this result (layer {self.layer}).")
        return int(hits[0, 0])

    def context_ids(self, neuron: int, slot: int, same_document: bool = True) -> list[int]:
        """Token ids of one trigger's context (ending at the trigger); by default cut at the last
        start token / separator so it begins at the trigger's own document."""
        ids = [int(i) for i in self.contexts[self.row(neuron), slot].tolist() if int(i) >= 0]
        if same_document and self.special_ids:
            for j in range(len(ids) - 1, -1, -1):
                if ids[j] in self.special_ids:
                    ids = ids[j + 1 :]
                    break
        return ids

    def examples(self, neuron: int, n: int | None = None) -> list[dict]:
        """The top-n triggers of a neuron: context text, trigger token, next token, coefficient."""
        j = self.row(neuron)
        out = []
        for s in range(self.k if n is None else min(n, self.k)):
            coef = float(self.coefficients[j, s])
            if coef == float("-inf"):
                break
            ctx = self.context_ids(neuron, s)
            out.append(
                {
                    "layer": self.layer,
                    "neuron": int(neuron),
                    "rank": s,
                    "coefficient": coef,
                    "context": self.tokenizer.decode(ctx[:-1]) if ctx else "",
                    "trigger": decode_tokens(self.tokenizer, ctx[-1:])[0] if ctx else "",
                    "next": decode_tokens(self.tokenizer, [int(self.next_tokens[j, s])])[0],
                }
            )
        return out

    def to_frame(self, neurons: Sequence[int] | None = None, n: int | None = 5):
        """One row per (neuron, trigger): coefficient, context text, trigger token, next token."""
        import pandas as pd

        chosen = self.neurons.tolist() if neurons is None else list(neurons)
        return pd.DataFrame([e for nrn in chosen for e in self.examples(nrn, n)])

    def show(self, model, *, neuron: int | None = None, n: int = 10) -> HTMLView:
        """circuitsvis colored tokens of `neuron`'s activation (default: the result's first neuron)
        over its top `n` contexts (offline). The model re-runs each context to colour its tokens."""
        from kvmem.memories.views import key_contexts_html

        return key_contexts_html(model, self, int(self.neurons[0]) if neuron is None else neuron, n=n)


@torch.no_grad()
def top_contexts_by_layer(
    model,
    corpus: Corpus,
    layers: Sequence[int] | int | None = None,
    *,
    neurons: Sequence[int] | Int[Tensor, "neuron"] | None = None,
    k: int = 25,
    window: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
    context: int | None = None,
    progress: bool | None = None,
) -> dict[int, TopContexts]:
    """`top_contexts` for several layers (all by default) in one pass over the corpus.

    `context` is how many tokens ending at each trigger are kept (default: the whole window).
    The forward stops after the deepest layer asked for. `progress`: None means
    `kvmem.config.PROGRESS`.
    """
    layers = check_layers(model, layers)
    k = check_k(k)
    idx = resolve_neurons(model, neurons)
    ctx_len = window if context is None else check_k(context, "context")
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    states = {l: RunningTopK(len(idx), k, ctx_len, device) for l in layers}
    names = {l: hook_post_name(model, l) for l in layers}
    all_neurons = len(idx) == model.cfg.d_mlp and bool((idx == torch.arange(model.cfg.d_mlp)).all())
    idx_dev = idx.to(device)
    store: dict[str, Tensor] = {}
    hooks = [(names[l], capture(store, names[l])) for l in layers]
    stop = max(layers) + 1
    n_tokens = 0
    show_bar = config.show_progress(progress)
    bar = tqdm(total=max_tokens, disable=not show_bar, desc=f"top contexts L{layers[0]}-{layers[-1]}", unit="tok")
    try:
        for batch in corpus_windows(model, corpus, window=window, batch_size=batch_size, max_tokens=max_tokens):
            tokens = batch.tokens.to(device)
            with model.hooks(fwd_hooks=hooks):
                run_to_layer(model, tokens, stop)
            mask = ~batch.valid.reshape(-1).to(device)
            for l in layers:
                act = store.pop(names[l])
                a = act.reshape(-1, act.shape[-1])
                if not all_neurons:
                    a = a[:, idx_dev]
                a = a.T.float().contiguous()  # a copy: never writes into the model's activation
                a.masked_fill_(mask[None, :], float("-inf"))
                states[l].update(a, batch)
            n_tokens += batch.n_tokens
            bar.update(batch.n_tokens)
    finally:
        bar.close()
    tok = getattr(model, "tokenizer", None)
    specials = special_ids(model)
    return {
        l: TopContexts(
            layer=l,
            neurons=idx,
            coefficients=s.values.cpu(),
            contexts=s.contexts.long().cpu(),
            next_tokens=s.next_tokens.long().cpu(),
            rows=s.rows.cpu(),
            positions=s.positions.cpu(),
            n_tokens=n_tokens,
            window=window,
            special_ids=specials,
            tokenizer=tok,
        )
        for l, s in states.items()
    }


def top_contexts(
    model,
    corpus: Corpus,
    layer: int,
    *,
    neurons: Sequence[int] | Int[Tensor, "neuron"] | None = None,
    k: int = 25,
    window: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
    context: int | None = None,
    progress: bool | None = None,
) -> TopContexts:
    """For every neuron of `layer` (or `neurons`), the k corpus prefixes where its key fires most.

    `corpus` is anything `kvmem.data.read_corpus` reads: a text file, "wiki", or strings. The key's
    coefficient is `hook_post` (the post-activation, gate included for gated MLPs). Memory is
    bounded by neurons x k x `context` tokens, independent of the corpus size.
    """
    layer = check_layer(model, layer)
    return top_contexts_by_layer(
        model, corpus, [layer], neurons=neurons, k=k, window=window, batch_size=batch_size,
        max_tokens=max_tokens, context=context, progress=progress,
    )[layer]
