"""Does the model know a fact? Rank and probability of the target's first token, batched."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem import config
from kvmem.errors import InvalidArgumentError
from kvmem.core.facts import Fact, tokenize_fact
from kvmem.core.tokenize import pad_batch, spec_for
from kvmem.core.readout import last_token_logits, token_rank


@dataclass(frozen=True)
class RecallResult:
    """Per fact: rank (0 = top-1) and probability of the target's first token, and the top-1 token."""

    facts: tuple[Fact, ...]
    ranks: Int[Tensor, "fact"] = field(repr=False)
    probs: Float[Tensor, "fact"] = field(repr=False)
    predictions: tuple[str, ...]

    def top_k(self, k: int = 1) -> float:
        """Fraction of facts whose target's first token is among the top k predictions."""
        return float((self.ranks < k).float().mean()) if len(self.facts) else float("nan")

    @property
    def known(self) -> Tensor:
        """Mask of facts answered top-1 (ROME's criterion for tracing a fact)."""
        return self.ranks == 0

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "prompt": [f.prompt for f in self.facts],
                "subject": [f.subject for f in self.facts],
                "target": [f.target_true for f in self.facts],
                "prediction": list(self.predictions),
                "rank": self.ranks.tolist(),
                "p_target": self.probs.tolist(),
            }
        )


@torch.no_grad()
def fact_recall(
    model,
    facts: Sequence[Fact],
    *,
    batch_size: int = 16,
    target: str = "true",
    progress: bool | None = None,
) -> RecallResult:
    """Rank of each fact's first target token after its prompt (with the model's start token).
    `target`: "true" or "new" (which of the facts' targets); `progress`: None means
    `kvmem.config.PROGRESS`."""
    if batch_size < 1:
        raise InvalidArgumentError("batch_size must be at least 1.")
    facts = tuple(facts)
    spec = spec_for(model)
    tokenized = [tokenize_fact(spec, f, target=target) for f in facts]
    ranks, probs, preds = [], [], []
    device = model.cfg.device
    show = config.show_progress(progress)
    for i in tqdm(range(0, len(facts), batch_size), disable=not show, desc="recall"):
        chunk = tokenized[i : i + batch_size]
        batch = pad_batch([t.tokens for t in chunk], spec.pad_id)
        logits = last_token_logits(model, batch.tokens.to(device), batch.last_pos)
        rank, p, logp = token_rank(logits, torch.tensor([t.target_ids[0] for t in chunk]))
        ranks.append(rank.cpu())
        probs.append(p.cpu())
        preds.extend(spec.tokenizer.decode([j]) for j in logp.argmax(-1).tolist())
    empty = torch.zeros(0)
    return RecallResult(
        facts,
        torch.cat(ranks) if ranks else empty.long(),
        torch.cat(probs) if probs else empty,
        tuple(preds),
    )


def answered_facts(
    model, facts: Sequence[Fact], *, batch_size: int = 16, progress: bool | None = None
) -> list[Fact]:
    """The facts the model answers top-1 (`fact_recall(...).known`), in their given order: the
    untouched facts whose accuracy an edit can only lower, tracked by the diagnose and stress runs."""
    facts = list(facts)
    known = fact_recall(model, facts, batch_size=batch_size, progress=progress).known.tolist()
    return [f for f, ok in zip(facts, known) if ok]
