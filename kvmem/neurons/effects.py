"""Suppressing and amplifying neurons (Dai et al. §4): p(gold target) with chosen neurons'
activations multiplied by a factor, against random neurons with the same count per layer."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kvmem.core.backend import run_to_layer
from kvmem.core.facts import Fact
from kvmem.core.hooks import scale_neurons
from kvmem.core.readout import final_logits
from kvmem.core.tokenize import pad_batch, spec_for
from kvmem.core.weights import check_layer, hook_post_name
from kvmem.errors import InvalidArgumentError, LayerOutOfRangeError
from kvmem.neurons.objective import TeacherForced, at_least_f32, one_fact, teacher_forced
from kvmem.neurons.results import KnowledgeNeurons, Neuron, NeuronEffect


def _neuron_list(model, neurons: Sequence[Neuron] | KnowledgeNeurons) -> list[Neuron]:
    if isinstance(neurons, KnowledgeNeurons):
        neurons = neurons.neurons
    out = []
    for item in neurons:
        try:
            l, n = item
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"Neurons are (layer, index) pairs, got {item!r}.") from None
        l = check_layer(model, int(l))
        if not 0 <= int(n) < model.cfg.d_mlp:
            raise LayerOutOfRangeError(f"neuron {n} of layer {l} out of range: MLPs have 0..{model.cfg.d_mlp - 1}.")
        out.append((l, int(n)))
    if len(set(out)) != len(out):
        raise InvalidArgumentError("The neuron list has duplicates; pass each (layer, neuron) once.")
    return out


def scaling_hooks(
    model,
    neurons: Sequence[Neuron] | KnowledgeNeurons,
    factor: float | int,
    *,
    positions: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> list[tuple[str, object]]:
    """`fwd_hooks` multiplying each (layer, neuron)'s hook_post by `factor` at `positions` (None: all)
    of `rows` (None: all).

    Use as `model.run_with_hooks(tokens, fwd_hooks=scaling_hooks(model, kn, 0.0, positions=[last]))`.
    """
    by_layer = defaultdict(list)
    for l, n in _neuron_list(model, neurons):
        by_layer[l].append(n)
    return [
        (hook_post_name(model, l), scale_neurons(positions, ns, float(factor), rows))
        for l, ns in sorted(by_layer.items())
    ]


def random_neurons(model, neurons: Sequence[Neuron], seed: int = 0) -> list[Neuron]:
    """As many random neurons per layer as `neurons` has, avoiding them (seeded torch.Generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    by_layer = Counter(l for l, _ in neurons)
    taken = set(neurons)
    out = []
    for l in sorted(by_layer):
        perm = torch.randperm(model.cfg.d_mlp, generator=gen).tolist()
        pick = [n for n in perm if (l, n) not in taken][: by_layer[l]]
        out.extend((l, n) for n in pick)
    return out


@torch.no_grad()
def _gold_probs(
    model,
    prepared: Sequence[TeacherForced],
    neuron_sets: Sequence[Sequence[Neuron] | None],
    factor: float,
    positions: str,
    batch_size: int,
) -> Float[Tensor, "set prompt"]:
    """p(target) of every prompt under each neuron set (None: no intervention), batched."""
    spec = spec_for(model)
    jobs = [(s, p) for s in range(len(neuron_sets)) for p in range(len(prepared))]
    out = torch.zeros(len(neuron_sets), len(prepared), dtype=torch.float64)
    device = model.cfg.device
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = pad_batch([prepared[p].tokens for _, p in chunk], spec.pad_id)
        hooks = []
        groups = defaultdict(list)  # (set, position or None) -> rows
        for r, (s, p) in enumerate(chunk):
            if neuron_sets[s]:
                groups[(s, prepared[p].last_pos if positions == "last" else None)].append(r)
        for (s, pos), rows in groups.items():
            hooks += scaling_hooks(model, neuron_sets[s], factor, positions=None if pos is None else [pos], rows=rows)
        with model.hooks(fwd_hooks=hooks):
            resid = run_to_layer(model, batch.tokens.to(device), model.cfg.n_layers)
        row_idx, pos_idx, ids = [], [], []
        for r, (_, p) in enumerate(chunk):
            for t, tid in enumerate(prepared[p].target_ids):
                row_idx.append(r)
                pos_idx.append(prepared[p].last_pos + t)
                ids.append(tid)
        picked = resid[torch.tensor(row_idx, device=resid.device), torch.tensor(pos_idx, device=resid.device)]
        logp = at_least_f32(final_logits(model, picked)).log_softmax(-1)
        tok = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].double().cpu()
        per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, torch.tensor(row_idx), tok)
        for r, (s, p) in enumerate(chunk):
            out[s, p] = per_row[r].exp()
    return out


def neuron_effect(
    model,
    facts: Fact | str | Sequence[Fact | str],
    target: str | None = None,
    *,
    neurons: Sequence[Neuron] | KnowledgeNeurons,
    factor: float | int = 0.0,
    positions: str = "last",
    n_controls: int = 1,
    seed: int = 0,
    batch_size: int = 32,
) -> NeuronEffect:
    """Relative change of p(gold target) when `neurons`' hook_post is multiplied by `factor`.

    `facts`: Facts sharing one `target_true`, or prompt strings with `target` (default: the
    target of `neurons` when it is a `KnowledgeNeurons`). `factor=0` suppresses (Dai et al.'s
    erase), `factor=2` amplifies. `positions="last"` scales the last prompt position only (Dai et
    al. scale the [MASK] position); `"all"` scales every position, including teacher-forced target
    tokens. The control scales `n_controls` draws of random neurons with the same count per layer
    (`random_neurons(..., seed=seed + d)`). `batch_size`: prompts per forward pass (padded to the
    longest, so small batches waste little). Multi-token targets: product of teacher-forced gold
    token probabilities, as in `integrated_gradients`.
    """
    if positions not in ("last", "all"):
        raise InvalidArgumentError(f"positions must be 'last' or 'all', got {positions!r}.")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
        raise InvalidArgumentError(f"factor must be a finite number (0 suppresses, 2 amplifies), got {factor!r}.")
    if isinstance(n_controls, bool) or not isinstance(n_controls, int) or n_controls < 0:
        raise InvalidArgumentError(f"n_controls must be an integer >= 0, got {n_controls!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if target is None and isinstance(neurons, KnowledgeNeurons):
        target = neurons.target
    texts, tgt = one_fact(facts, target)
    chosen = _neuron_list(model, neurons)
    if not chosen:
        raise InvalidArgumentError("No neurons to scale; pass at least one (layer, neuron) pair.")
    controls = [random_neurons(model, chosen, seed + d) for d in range(n_controls)]
    prepared = [teacher_forced(model, p, tgt) for p in texts]
    probs = _gold_probs(model, prepared, [None, chosen, *controls], float(factor), positions, batch_size)
    return NeuronEffect(
        prompts=tuple(texts), target=tgt, neurons=tuple(chosen), factor=float(factor), positions=positions,
        p_before=probs[0], p_after=probs[1], control_neurons=tuple(tuple(c) for c in controls),
        p_control=probs[2:],
    )
