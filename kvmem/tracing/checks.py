"""Checks of a fact's target before its results are read: is the target several tokens, of which
an analysis scores only the first, and does the model predict it at all (`kvmem.config.predicts`)?
Each problem is a warning (`kvmem.errors.KvmemWarning`); `warnings.simplefilter("error",
KvmemWarning)` (the CLI's `--strict`) turns them into exceptions.

Which analyses use which part of a target: causal tracing and the memory view score the target's
first token (their measure is one next-token probability or logit); knowledge neurons (integrated
gradients) and ROME use the whole target, teacher-forced.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from kvmem import config
from kvmem.core.facts import Fact, tokenize_fact
from kvmem.core.readout import last_token_logits, token_rank
from kvmem.errors import MultiTokenTargetWarning, UnpredictedFactWarning


@dataclass(frozen=True)
class TargetCheck:
    """A fact's target as the model sees it: its tokens, and its first token's probability and
    rank (0: the top token) after the prompt."""

    prompt: str
    target: str
    target_tokens: tuple[str, ...]
    p: float
    rank: int

    @property
    def predicted(self) -> bool:
        return config.predicts(self.rank, self.p)

    def remarks(self, first_token_only: str | None) -> list[tuple[type[Warning], str]]:
        """(warning class, message) per problem; `first_token_only` names the analyses that score
        only the first token (None: none does)."""
        out: list[tuple[type[Warning], str]] = []
        n = len(self.target_tokens)
        if first_token_only and n > 1:
            out.append((MultiTokenTargetWarning,
                        f"target {self.target!r} is {n} tokens; {first_token_only} "
                        f"{'scores' if ' and ' not in first_token_only else 'score'} its first token "
                        f"{self.target_tokens[0]!r} only"))
        if not self.predicted:
            out.append((UnpredictedFactWarning,
                        f"the model does not predict {self.target!r} after {self.prompt!r}: its first token "
                        f"{self.target_tokens[0]!r} ranks {self.rank + 1} among the next tokens (1: the top) "
                        f"with p = {self.p:.2g} "
                        f"(kvmem.config.predicts: top {config.PREDICTED_TOP_K} and p >= {config.PREDICTED_MIN_P}), "
                        "so what the analyses find may not be how the model recalls it; check the prompt and "
                        "the target's spelling"))
        return out

    def warn(self, first_token_only: str | None, stacklevel: int = 3) -> tuple[str, ...]:
        """Emit `remarks` as warnings; returns their messages."""
        remarks = self.remarks(first_token_only)
        for category, message in remarks:
            warnings.warn(message, category, stacklevel=stacklevel)
        return tuple(m for _, m in remarks)


def target_check_from_logits(model, prompt: str, target: str, target_ids, logits) -> TargetCheck:
    """The `TargetCheck` of next-token `logits` [vocab] after `prompt` (no forward pass)."""
    rank, p, _ = token_rank(logits.detach()[None], torch.tensor([int(target_ids[0])]))
    tokens = tuple(model.tokenizer.decode([int(t)]) for t in target_ids)
    return TargetCheck(prompt, target, tokens, float(p[0]), int(rank[0]))


@torch.no_grad()
def check_target(model, fact: Fact, which: str = "true") -> TargetCheck | None:
    """The `TargetCheck` of `fact`'s target (`which`: "true" or "new"); None when it has none."""
    if (fact.target_true if which == "true" else fact.target_new) is None:
        return None
    tf = tokenize_fact(model, fact, target=which)
    logits = last_token_logits(model, tf.tokens[None].to(model.cfg.device))[0]  # unembeds the last position only
    return target_check_from_logits(model, fact.prompt, fact.target(which), tf.target_ids, logits)


__all__ = ["TargetCheck", "check_target", "target_check_from_logits"]
