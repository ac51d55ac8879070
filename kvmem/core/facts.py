"""Facts and where their subject sits: `Fact`, `SubjectSpan`, `TokenizedFact`, `tokenize_fact`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from kvmem.core.tokenize import char_offsets, encode, spec_for, target_token_ids
from kvmem.errors import (
    AmbiguousSubjectError,
    EmptyTargetError,
    InvalidArgumentError,
    PromptTooLongError,
    SubjectNotFoundError,
)


@dataclass(frozen=True)
class Fact:
    """A factual prompt: `prompt` ends right before the object; `subject` occurs in `prompt`.

    `target_true` is what the model should say now; `target_new` is the object an edit asks for.
    Targets are stored as given; the leading space a continuation needs is added at tokenization.
    """

    prompt: str
    subject: str
    target_true: str | None = None
    target_new: str | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgumentError("Fact.prompt must be a non-empty string.")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise InvalidArgumentError("Fact.subject must be a non-empty string.")
        if self.subject not in self.prompt:
            raise SubjectNotFoundError(
                f"Subject {self.subject!r} does not occur in prompt {self.prompt!r}. "
                "Pass the subject exactly as it is written in the prompt (case and spacing matter)."
            )
        for name in ("target_true", "target_new"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise EmptyTargetError(f"Fact.{name} is empty; pass a non-empty string or None.")

    @classmethod
    def from_template(
        cls,
        template: str,
        subject: str,
        target_true: str | None = None,
        target_new: str | None = None,
        relation_id: str | None = None,
    ) -> "Fact":
        """Build from a ROME-style template with one `{}` for the subject: `"{} is located in"`."""
        if template.count("{}") != 1:
            raise InvalidArgumentError(
                f"Template {template!r} must contain exactly one '{{}}' where the subject goes."
            )
        return cls(template.replace("{}", subject), subject, target_true, target_new, relation_id)

    def with_prompt(self, prompt: str) -> "Fact":
        """The same fact asked with another prompt (a paraphrase or a prefixed prompt)."""
        return replace(self, prompt=prompt)

    def target(self, which: Literal["true", "new"] = "true") -> str:
        value = self.target_true if which == "true" else self.target_new
        if value is None:
            raise EmptyTargetError(
                f"Fact for subject {self.subject!r} has no target_{which}; "
                f"set Fact(..., target_{which}=...) first."
            )
        return value


def occurrences(text: str, sub: str) -> list[int]:
    """Character offsets of every occurrence of `sub` in `text` (overlapping ones included)."""
    starts, i = [], text.find(sub)
    while i != -1:
        starts.append(i)
        i = text.find(sub, i + 1)
    return starts


@dataclass(frozen=True)
class SubjectSpan:
    """Token span `[start, end)` of the subject, counted with the start token if one is used.

    `exact` is False when the subject begins or ends inside a token (e.g. subject "Pari" in
    "Paris"): the span then covers every token the subject touches.
    """

    start: int
    end: int
    exact: bool

    @property
    def last(self) -> int:
        return self.end - 1

    def __len__(self) -> int:
        return self.end - self.start


def subject_span(
    model: Any,
    prompt: str,
    subject: str,
    occurrence: int | None = None,
    prepend_bos: bool | None = None,
    boundary: Literal["expand", "strict"] = "expand",
) -> SubjectSpan:
    """Where `subject` sits in the tokens of `prompt`.

    `occurrence` picks one when the subject occurs several times (0 = first, -1 = last); with
    `None` a repeated subject raises `AmbiguousSubjectError`. `boundary="strict"` raises when the
    subject starts or ends inside a token instead of widening the span.
    """
    spec = spec_for(model)
    starts = occurrences(prompt, subject)
    if not subject or not starts:
        raise SubjectNotFoundError(
            f"Subject {subject!r} does not occur in prompt {prompt!r}. "
            "Pass the subject exactly as it is written in the prompt (case and spacing matter)."
        )
    if occurrence is None:
        if len(starts) > 1:
            raise AmbiguousSubjectError(
                f"Subject {subject!r} occurs {len(starts)} times in {prompt!r}; "
                "pass occurrence=0 (first), -1 (last) or another index."
            )
        occurrence = 0
    try:
        char_start = starts[occurrence]
    except IndexError:
        raise SubjectNotFoundError(
            f"occurrence={occurrence} but subject {subject!r} occurs {len(starts)} time(s)."
        ) from None
    char_end = char_start + len(subject)
    ids, offsets = char_offsets(spec, prompt)
    touched = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start]
    if not touched:
        raise SubjectNotFoundError(f"Subject {subject!r} maps to no token of {prompt!r}.")
    first, last = touched[0], touched[-1]
    head = prompt[offsets[first][0] : char_start]
    exact = (head == "" or head.isspace()) and offsets[last][1] == char_end
    if boundary == "strict" and not exact:
        pieces = [spec.tokenizer.decode([ids[i]]) for i in touched]
        raise SubjectNotFoundError(
            f"Subject {subject!r} starts or ends inside a token of {prompt!r} (tokens {pieces}); "
            "use boundary='expand' or write the subject to end on a token boundary."
        )
    shift = 1 if (spec.prepends_bos if prepend_bos is None else prepend_bos) and spec.bos_id is not None else 0
    return SubjectSpan(first + shift, last + 1 + shift, exact)


@dataclass(frozen=True)
class TokenizedFact:
    """A fact as the model sees it: prompt tokens, subject span and (optionally) target ids."""

    fact: Fact
    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    subject: SubjectSpan
    target_ids: tuple[int, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def last_pos(self) -> int:
        return self.n_tokens - 1

    def teacher_forced(self) -> tuple[Int[Tensor, "pos"], list[int]]:
        """Prompt + all but the last target token, and the positions that predict each target token."""
        if not self.target_ids:
            raise EmptyTargetError("This TokenizedFact was made without a target.")
        extra = torch.tensor(self.target_ids[:-1], dtype=self.tokens.dtype)
        tokens = torch.cat([self.tokens, extra])
        positions = [self.last_pos + i for i in range(len(self.target_ids))]
        return tokens, positions


def tokenize_fact(
    model: Any,
    fact: Fact,
    target: Literal["true", "new"] | str | None = "true",
    occurrence: int | None = None,
) -> TokenizedFact:
    """Tokenize a fact for the model; `target` is "true", "new", a literal string, or None."""
    if not isinstance(fact, Fact):
        raise InvalidArgumentError(
            f"Expected a kvmem.Fact, got {type(fact).__name__}; build one with "
            "kvmem.Fact(prompt, subject, target_true=...)."
        )
    spec = spec_for(model)
    ids = encode(spec, fact.prompt)
    span = subject_span(spec, fact.prompt, fact.subject, occurrence=occurrence)
    if target is None:
        tids = None
    else:
        text = fact.target(target) if target in ("true", "new") else target
        tids = tuple(target_token_ids(spec, fact.prompt, text))
    total = len(ids) + (len(tids) - 1 if tids else 0)
    if total > spec.n_ctx:
        raise PromptTooLongError(
            f"Prompt {fact.prompt[:60]!r}... needs {total} tokens but the model's context is "
            f"{spec.n_ctx}; shorten the prompt or the target."
        )
    str_tokens = tuple(spec.tokenizer.decode([i]) for i in ids)
    return TokenizedFact(fact, torch.tensor(ids, dtype=torch.long), str_tokens, span, tids)
