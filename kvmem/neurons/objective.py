"""The quantity every knowledge-neuron number is about: p(gold target | prompt).

A multi-token target is teacher-forced with its gold tokens (never the model's argmax) and the
objective is the *product* of the token probabilities, i.e. the probability of the whole target
string `p(t_1 | prompt) * p(t_2 | prompt, t_1) * ...`. For a one-token target this is Dai et
al.'s objective exactly. The neurons are read at the *last prompt position*, the one that
predicts the first target token (Dai et al. use the `[MASK]` position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kvmem.core.facts import Fact
from kvmem.core.readout import final_logits
from kvmem.core.tokenize import encode, spec_for, target_token_ids
from kvmem.errors import EmptyTargetError, InvalidArgumentError, PromptTooLongError


@dataclass(frozen=True)
class TeacherForced:
    """One prompt with its gold target, tokenized for the objective.

    `tokens` are the prompt's tokens followed by all but the last target token; position
    `last_pos + t` predicts `target_ids[t]`. `str_tokens` are the prompt's tokens as text.
    """

    prompt: str
    target: str
    tokens: Int[Tensor, "pos"]
    last_pos: int
    target_ids: tuple[int, ...]
    str_tokens: tuple[str, ...]


def _prompt_and_target(fact: str | Fact, target: str | None) -> tuple[str, str]:
    if isinstance(fact, Fact):
        if target is None:
            target = fact.target("true")
        elif fact.target_true is not None and fact.target_true.strip() != target.strip():
            raise InvalidArgumentError(
                f"The Fact's target_true {fact.target_true!r} differs from target={target!r}; "
                "pass one of them (or make them equal)."
            )
        fact = fact.prompt
    if not isinstance(fact, str) or not fact.strip():
        raise InvalidArgumentError(f"Pass a kvmem.Fact or a non-empty prompt string, got {fact!r}.")
    if target is None:
        raise EmptyTargetError("No target given; pass target='Paris' (or a Fact with target_true).")
    if not isinstance(target, str) or not target.strip():
        raise EmptyTargetError(f"Target {target!r} is empty; give the answer text, e.g. 'Paris'.")
    return fact, target


def teacher_forced(
    model, fact: str | Fact, target: str | None = None, *, prepend_bos: bool | None = None
) -> TeacherForced:
    """Tokenize a Fact (or a prompt with `target`) with its teacher-forced gold target, checking
    that the target is usable after this prompt."""
    prompt, target = _prompt_and_target(fact, target)
    spec = spec_for(model)
    prompt_ids = encode(spec, prompt, prepend_bos=prepend_bos)
    tids = target_token_ids(spec, prompt, target)
    # The target must continue the prompt's own tokens: where appending it re-tokenizes the
    # prompt's end (a prompt ending in a space, a target glued to the last word), the model would
    # never see these tokens after this prompt.
    joint_text = prompt + ("" if target[0].isspace() or prompt[-1].isspace() else " ") + target
    raw_prompt = encode(spec, prompt, prepend_bos=False)
    raw_joint = encode(spec, joint_text, prepend_bos=False)
    if raw_joint[: len(raw_prompt)] != raw_prompt:
        raise InvalidArgumentError(
            f"Appending target {target!r} changes how prompt {prompt!r} is tokenized at the junction, "
            "so the target is not tokenizable as given after this prompt; remove trailing spaces from "
            "the prompt (kvmem adds the space before the target) or split words differently."
        )
    decoded = spec.tokenizer.decode(list(tids))
    if decoded.strip() != target.strip():
        raise InvalidArgumentError(
            f"Target {target!r} does not survive tokenization (it decodes back as {decoded!r}); "
            "use characters the tokenizer knows."
        )
    tokens = prompt_ids + list(tids[:-1])
    if len(tokens) > spec.n_ctx:
        raise PromptTooLongError(
            f"Prompt {prompt[:60]!r} plus target needs {len(tokens)} tokens but the model's context is "
            f"{spec.n_ctx}; shorten the prompt or the target."
        )
    str_tokens = tuple(spec.tokenizer.decode([i]) for i in prompt_ids)
    return TeacherForced(prompt, target, torch.tensor(tokens, dtype=torch.long), len(prompt_ids) - 1,
                         tuple(int(i) for i in tids), str_tokens)


def one_fact(facts: str | Fact | Sequence[str | Fact], target: str | None) -> tuple[list[str], str]:
    """The prompts of one fact (its paraphrases) and their shared target: Facts bring their own
    `target_true`, strings need `target`; all must agree."""
    if isinstance(facts, (str, Fact)):
        facts = [facts]
    facts = list(facts)
    if not facts:
        raise InvalidArgumentError("Pass at least one prompt (Dai et al. use a fact's paraphrases).")
    targets = {f.target_true.strip() for f in facts if isinstance(f, Fact) and f.target_true is not None}
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise EmptyTargetError(f"Target {target!r} is empty; give the answer text, e.g. 'Paris'.")
        targets.add(target.strip())
    if len(targets) > 1:
        raise InvalidArgumentError(
            f"The prompts of one fact must share one target, got {sorted(targets)}; "
            "call once per fact (group prompts by their answer)."
        )
    if not targets:
        raise EmptyTargetError("No target given; pass target='Paris' (or Facts with target_true).")
    tgt = target if target is not None else next(
        f.target_true for f in facts if isinstance(f, Fact) and f.target_true is not None)
    texts = [f.prompt if isinstance(f, Fact) else f for f in facts]
    if len(set(texts)) != len(texts):
        raise InvalidArgumentError("The prompts contain duplicates; pass each paraphrase once.")
    return texts, tgt


def at_least_f32(t: Tensor) -> Tensor:
    """`t` in float32 or wider: log-softmax over a large vocabulary in bfloat16 loses the answer."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gold_logprob(
    model, resid: Float[Tensor, "row pos d_model"], target_ids: Int[Tensor, "target"]
) -> Float[Tensor, "row"]:
    """Sum over target tokens of log p(token) from final residuals; `resid[:, t]` predicts
    `target_ids[t]` (only those positions are unembedded)."""
    rows, n_t = resid.shape[0], target_ids.shape[0]
    logits = at_least_f32(final_logits(model, resid[:, :n_t].reshape(rows * n_t, -1)))
    logp = logits.log_softmax(-1).gather(1, target_ids.repeat(rows)[:, None])[:, 0]
    return logp.view(rows, n_t).sum(-1)
