"""Plain reference implementations: the slow, obvious way to compute what kvmem computes fast.

Tests check kvmem against them; benchmarks time kvmem against them (they import this file through
`benchmarks/common.py`). Written with TransformerLens's own forward and hooks, one run per cell or
per layer, so that they share as little as possible with the code they check; only tokenization,
the hook factories and IG's quadrature nodes come from kvmem.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvmem.core.facts import tokenize_fact
from kvmem.core.hooks import add_noise, freeze, restore
from kvmem.neurons import riemann_nodes, teacher_forced

# Where each kind of causal trace restores, per layer (TransformerLens hook names).
HOOK = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}


def restored_probability(model, batch, noise_hook, restores, answer: int, freezes=()) -> torch.Tensor:
    """One corrupted run (`noise_hook` on every row of `batch`) with clean states put back: the
    mean over rows of the answer's probability at the last position.

    `restores` / `freezes`: (hook name, recorded activation, position) triples; a restore writes the
    clean activation at that position, a freeze holds the corrupted one there."""
    hooks = [noise_hook]
    hooks += [(name, restore(clean, [pos])) for name, clean, pos in restores]
    hooks += [(name, freeze(corrupt, [pos])) for name, corrupt, pos in freezes]
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    return torch.softmax(logits[:, -1], -1)[:, answer].mean()


@torch.no_grad()
def naive_trace(model, fact, kind, window, noise, samples, seed, sever=None):
    """ROME's loop, written plainly: one run_with_hooks per (layer, token) cell.

    Returns (scores [layer, token], p_clean, p_corrupt); the answer is the clean top token."""
    tf = tokenize_fact(model, fact, target=None)
    n_layers, n_pos = model.cfg.n_layers, tf.n_tokens
    batch = tf.tokens[None].expand(samples, -1)
    noise_hook = ("hook_embed", add_noise(range(tf.subject.start, tf.subject.end), noise, seed=seed))
    clean_logits, clean = model.run_with_cache(tf.tokens[None])
    answer = int(clean_logits[0, -1].argmax())
    p_clean = float(torch.softmax(clean_logits[0, -1], -1)[answer])
    with model.hooks(fwd_hooks=[noise_hook]):
        corrupt_logits, corrupt = model.run_with_cache(batch)
    p_corrupt = float(torch.softmax(corrupt_logits[:, -1], -1)[:, answer].mean())
    scores = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        if kind == "resid":
            layers = [layer]
        else:  # ROME: range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))
            layers = range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
        for t in range(n_pos):
            restores = [(HOOK[kind].format(j), clean[HOOK[kind].format(j)], t) for j in layers]
            freezes = [(HOOK[sever].format(j), corrupt[HOOK[sever].format(j)], t) for j in range(n_layers)] if sever else []
            scores[layer, t] = restored_probability(model, batch, noise_hook, restores, answer, freezes)
    return scores, p_clean, p_corrupt


def per_layer_ig(model, prompt, target, layers: Sequence[int], steps, rule, site="post", baseline=None):
    """Integrated gradients of the product of the target's teacher-forced token probabilities with
    respect to the MLP activations (`hook_<site>`) at the last prompt position, the plain way: for
    each layer, a full-length batch of one row per quadrature node (`kvmem.neurons.riemann_nodes`)
    and its own backward. `baseline`: one row per layer (default zeros). Returns [layer, neuron]."""
    prep = teacher_forced(model, prompt, target)
    nodes, weights = riemann_nodes(steps, rule)
    tokens = prep.tokens[None]
    P, T = prep.last_pos, len(prep.target_ids)
    tid = torch.tensor(prep.target_ids)
    names = [f"blocks.{l}.mlp.hook_{site}" for l in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = []
    for i, name in enumerate(names):
        x = cache[name][0, P]
        b = torch.zeros_like(x) if baseline is None else baseline[i]
        h = (b + nodes[:, None].to(x.dtype) * (x - b)).detach().requires_grad_(True)

        def hook(act, hook):
            act = act.clone()
            act[:, P] = h
            return act

        logits = model.run_with_hooks(tokens.expand(len(nodes), -1), fwd_hooks=[(name, hook)])
        logp = logits.log_softmax(-1)[:, P : P + T]
        p = logp.gather(2, tid[None, :, None].expand(len(nodes), T, 1))[..., 0].sum(-1).exp()
        (g,) = torch.autograd.grad(p.sum(), h)
        out.append((x - b) * (g * weights[:, None].to(g.dtype)).sum(0))
    return torch.stack(out)


# Plain English sentences for second-moment statistics on tiny models (the editing tests' corpus).
ENGLISH_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In 1889 the tower was finished for the world fair in the French capital.",
    "Rivers flow into the sea, carrying sand and small stones from the mountains.",
    "She plays the violin every evening; her brother prefers the piano and the drums.",
    "Markets opened higher on Monday after the central bank held interest rates steady.",
]
