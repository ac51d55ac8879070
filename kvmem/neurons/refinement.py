"""Knowledge neurons of one fact (Dai et al.): attribute each paraphrase prompt, keep the neurons
above a share of each prompt's maximum, then keep those most prompts agree on."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import run_to_layer
from kvmem import config
from kvmem.core.facts import Fact
from kvmem.core.hooks import capture
from kvmem.core.tokenize import encode, pad_batch, spec_for
from kvmem.core.weights import check_layers
from kvmem.errors import InvalidArgumentError
from kvmem.neurons.attribution import attribute, site_hook
from kvmem.neurons.objective import one_fact, teacher_forced
from kvmem.neurons.quadrature import resolve_rule, riemann_nodes
from kvmem.neurons.results import KnowledgeNeurons, Neuron


def _check_share(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise InvalidArgumentError(f"{name} must be a number in (0, 1], got {value!r}.")
    return float(value)


def refine(
    coarse: Sequence[Sequence[Neuron]],
    share: float = 0.7,
    *,
    min_shared: int = 1,
    target_count: tuple[int, int] | None = None,
    share_step: float = 0.05,
    max_adjust: int = 6,
) -> tuple[list[Neuron], float, Counter]:
    """Neurons in at least max(share x n_prompts, min_shared) of the per-prompt `coarse` sets.

    Returns (kept neurons, the share used, per-neuron prompt counts). With `target_count=(lo, hi)`
    the share is moved by `share_step` (down when fewer than lo neurons survive, up when more than
    hi), at most `max_adjust` times, as Dai et al.'s code does (they adjust the per-relation
    average to 2..5; here it is per fact).
    """
    counts: Counter = Counter()
    for neurons in coarse:
        counts.update(set(map(tuple, neurons)))
    n = len(coarse)

    def kept(s: float) -> list[Neuron]:
        need = max(s * n, min_shared)
        return sorted(k for k, v in counts.items() if v >= need - 1e-9)

    out = kept(share)
    if target_count is not None:
        lo, hi = target_count
        if lo > hi or lo < 0:
            raise InvalidArgumentError(f"target_count must be (lo, hi) with 0 <= lo <= hi, got {target_count!r}.")
        for _ in range(max_adjust):
            if len(out) < lo:
                share = max(share - share_step, 1e-9)
            elif len(out) > hi:
                share = min(share + share_step, 1.0)
            else:
                break
            out = kept(share)
    return out, share, counts


def knowledge_neurons(
    model,
    facts: Fact | str | Sequence[Fact | str],
    target: str | None = None,
    *,
    threshold: float = 0.2,
    share: float = 0.7,
    min_shared: int = 1,
    target_count: tuple[int, int] | None = None,
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    rule: str = "auto",
    baseline: str | Float[Tensor, "layer d_mlp"] = "zero",
    site: str = "post",
    batch_size: int | None = None,
    memory_budget: int = config.DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
) -> KnowledgeNeurons:
    """Dai et al.'s knowledge neurons of one fact from its paraphrase prompts.

    `facts`: Facts sharing one `target_true`, or prompt strings with `target`. Per prompt, keep
    neurons with attribution > `threshold` x that prompt's maximum (t = 0.2); keep neurons kept in
    at least `share` of the prompts (p = 0.7; Dai et al. also require 3 prompts, `min_shared=3`).
    `target_count=(2, 5)` adjusts the share to land in that range (Dai et al.'s code does this per
    relation). `layers`, `steps`, `rule`, `baseline`, `site`, `batch_size`, `memory_budget`: as in
    `integrated_gradients`; `progress`: a bar over the prompts (None: `kvmem.config.PROGRESS`).
    """
    threshold = _check_share("threshold", threshold)
    share = _check_share("share", share)
    if isinstance(min_shared, bool) or not isinstance(min_shared, int) or min_shared < 1:
        raise InvalidArgumentError(f"min_shared must be an integer >= 1, got {min_shared!r}.")
    texts, tgt = one_fact(facts, target)
    chosen = check_layers(model, layers)
    prepared = [teacher_forced(model, p, tgt) for p in texts]
    rule = resolve_rule(model, rule, chosen)
    riemann_nodes(steps, rule)
    show_bar = config.show_progress(progress)
    attrs = tuple(
        attribute(model, tf, chosen, steps=steps, baseline=baseline, rule=rule, site=site, batch_size=batch_size,
                  memory_budget=memory_budget, progress=False)
        for tf in tqdm(prepared, disable=not show_bar, desc="knowledge neurons")
    )
    coarse = [a.neurons_above(threshold) for a in attrs]
    neurons, used_share, counts = refine(coarse, share, min_shared=min_shared, target_count=target_count)
    acts, str_tokens = _neuron_activations(model, texts, neurons, site)
    return KnowledgeNeurons(
        prompts=tuple(texts), target=tgt, neurons=tuple(neurons), threshold=threshold, share=used_share,
        min_shared=min_shared, counts=dict(counts), attributions=attrs, str_tokens=str_tokens,
        activations=acts,
    )


@torch.no_grad()
def _neuron_activations(model, prompts: Sequence[str], neurons: Sequence[Neuron], site: str = "post"):
    """Each neuron's activation at every token of every prompt: `[prompt, pos, neuron]` and the
    prompts' tokens as text (what `KnowledgeNeurons.show` colours)."""
    spec = spec_for(model)
    rows = [encode(spec, p) for p in prompts]
    batch = pad_batch(rows, spec.pad_id)
    str_tokens = tuple(tuple(spec.tokenizer.decode([i]) for i in r) for r in rows)
    out = torch.zeros(len(prompts), batch.tokens.shape[1], len(neurons))
    if not neurons:
        return out, str_tokens
    by_layer = defaultdict(list)
    for k, (l, n) in enumerate(neurons):
        by_layer[l].append((k, n))
    kept: dict = {}
    names = [site_hook(l, site) for l in by_layer]
    with model.hooks(fwd_hooks=[(n, capture(kept, n)) for n in names]):
        run_to_layer(model, batch.tokens.to(model.cfg.device), max(by_layer) + 1)
    for l, items in by_layer.items():
        act = kept[site_hook(l, site)].float().cpu()
        for k, n in items:
            out[:, :, k] = act[:, :, n]
    return out, str_tokens
