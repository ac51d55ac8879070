"""Reading predictions off the residual stream at only the positions that matter.

Unembedding every position is the costliest step for large-vocabulary models (Gemma's 262k
tokens cost more per position than all 18 of its layers), and TransformerLens's `Unembed`
copies `W_U.T` on every call. Analyses that read one position per row go through here.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.core.backend import run_to_layer


def final_logits(model, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_vocab"]:
    """Logits from final-layer residual vectors: final norm, unembedding, soft-cap as the model does."""
    x = resid[:, None, :]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = x[:, 0, :] @ model.W_U
    if getattr(model, "unembed", None) is not None and getattr(model.unembed, "b_U", None) is not None:
        logits = logits + model.unembed.b_U
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def last_token_logits(
    model, tokens: Int[Tensor, "batch pos"], last_pos: Int[Tensor, "batch"] | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token logits at `last_pos` of each row (default: the final column), unembedding only those."""
    resid = run_to_layer(model, tokens, model.cfg.n_layers)
    if last_pos is None:
        picked = resid[:, -1]
    else:
        picked = resid[torch.arange(resid.shape[0], device=resid.device), last_pos.to(resid.device)]
    return final_logits(model, picked)


def token_rank(
    logits: Float[Tensor, "batch d_vocab"], token_ids: Int[Tensor, "batch"]
) -> tuple[Int[Tensor, "batch"], Float[Tensor, "batch"], Float[Tensor, "batch d_vocab"]]:
    """Each row's `token_ids` entry among its next-token logits: its rank (0: the top token; ties
    rank with it), its probability, and the row's log-probabilities (float32 or wider)."""
    logp = logits.float().log_softmax(-1)
    token_logp = logp.gather(1, token_ids.to(logp.device)[:, None])[:, 0]
    return (logp > token_logp[:, None]).sum(-1), token_logp.exp(), logp
