"""Seeded top-k sampling with a key-value cache, unembedding only the newest position.

Used for ROME's random context prefixes and for the generation-entropy metric. All samples of
one call share the same prompt, so rows never need padding.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from kvmem.core.backend import decoding
from kvmem.core.mlp_layout import pretransposed_mlps
from kvmem.core.readout import final_logits
from kvmem.errors import InvalidArgumentError


@torch.no_grad()
def sample_tokens(
    model,
    prompt: Int[Tensor, "pos"],
    n: int,
    max_new_tokens: int,
    top_k: int = 5,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "n new"]:
    """`n` continuations of `prompt`, each `max_new_tokens` long, sampled from the top `top_k`
    next tokens (ROME's `generate_fast` samples top-5). Randomness only from `generator`."""
    if n < 1 or max_new_tokens < 0 or top_k < 1:
        raise InvalidArgumentError("Need n ≥ 1, max_new_tokens ≥ 0 and top_k ≥ 1.")
    if prompt.numel() + max_new_tokens > model.cfg.n_ctx:
        raise InvalidArgumentError(
            f"Prompt ({prompt.numel()} tokens) plus {max_new_tokens} new tokens exceeds the context "
            f"of {model.cfg.n_ctx}; generate fewer tokens."
        )
    device = next(model.parameters()).device
    out = torch.empty(n, max_new_tokens, dtype=torch.long)
    if max_new_tokens == 0:
        return out
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    tokens = prompt.to(device)[None].expand(n, -1).contiguous()
    # one token per forward: TransformerLens's per-call weight copies would dominate (bit-identical without)
    with pretransposed_mlps(model), decoding(model, n, device) as step:
        for i in range(max_new_tokens):
            resid = step(tokens)
            logits = final_logits(model, resid[:, -1]).float()
            top, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            probs = top.softmax(-1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
            nxt = idx.cpu().gather(1, choice[:, None])[:, 0]
            out[:, i] = nxt
            tokens = nxt[:, None].to(device)
    return out
