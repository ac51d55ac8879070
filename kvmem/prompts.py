"""Every tokenization rule kvmem uses: facts, start tokens, targets, subject spans, padding.

Analyses never call the tokenizer themselves; they go through this module so that BOS handling,
leading spaces and subject spans are decided in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from kvmem.errors import (
    EmptyTargetError,
    InvalidArgumentError,
    PromptTooLongError,
    SubjectNotFoundError,
)


class AmbiguousSubjectError(SubjectNotFoundError):
    """The subject occurs more than once and no occurrence was chosen."""


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


@dataclass(frozen=True)
class TokenizerSpec:
    """What tokenization needs to know about a model: its tokenizer, start token and context."""

    tokenizer: Any
    bos_id: int | None
    n_ctx: int
    pad_id: int = 0

    @property
    def prepends_bos(self) -> bool:
        return self.bos_id is not None


def spec_for(model_or_spec: Any) -> TokenizerSpec:
    """The tokenization spec of a HookedTransformer (or a spec passed through unchanged)."""
    if isinstance(model_or_spec, TokenizerSpec):
        return model_or_spec
    tokenizer = getattr(model_or_spec, "tokenizer", None)
    cfg = getattr(model_or_spec, "cfg", None)
    if tokenizer is None or cfg is None:
        raise InvalidArgumentError(
            "Expected a HookedTransformer with a tokenizer (model.tokenizer is None). "
            "Load it with kvmem.load_model(...) or set model.set_tokenizer(tokenizer)."
        )
    bos_id = tokenizer.bos_token_id if cfg.default_prepend_bos else None
    if cfg.default_prepend_bos and bos_id is None:
        raise InvalidArgumentError(
            "The model prepends BOS (cfg.default_prepend_bos) but its tokenizer has no bos_token; "
            "set tokenizer.bos_token or cfg.default_prepend_bos = False."
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return TokenizerSpec(tokenizer, bos_id, int(cfg.n_ctx), int(pad_id))


def _encode_raw(spec: TokenizerSpec, text: str) -> list[int]:
    return list(spec.tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(model: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of `text`, with the model's start token unless `prepend_bos=False`."""
    spec = spec_for(model)
    ids = _encode_raw(spec, text)
    if (spec.prepends_bos if prepend_bos is None else prepend_bos) and spec.bos_id is not None:
        ids = [spec.bos_id] + ids
    return ids


def target_token_ids(model: Any, prompt: str, target: str) -> list[int]:
    """The ids that continue `prompt` with `target`, as the model would see them in one string.

    A space is put in front of the target when neither side has one ("Paris" after "is in" is
    " Paris"). The ids are read off the joint tokenization, so tokenizers whose pieces depend on
    what precedes them (SentencePiece's word-start marker) get the continuation right; where the
    prompt's own tokens change at the junction, the target is tokenized alone instead.
    """
    if not isinstance(target, str) or not target.strip():
        raise EmptyTargetError(f"Target {target!r} is empty; give the answer text, e.g. 'Paris'.")
    spec = spec_for(model)
    if not target[0].isspace() and not (prompt and prompt[-1].isspace()):
        target = " " + target
    prompt_ids = _encode_raw(spec, prompt)
    joint = _encode_raw(spec, prompt + target)
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        ids = joint[len(prompt_ids) :]
    else:
        ids = _encode_raw(spec, target)
    if not ids:
        raise EmptyTargetError(f"Target {target!r} tokenizes to no tokens.")
    return ids


def _char_offsets(spec: TokenizerSpec, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and each token's character span in it."""
    tok = spec.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: recover them by decoding growing prefixes.
    ids = _encode_raw(spec, text)
    offsets, prev = [], 0
    for i in range(len(ids)):
        end = len(tok.decode(ids[: i + 1]))
        offsets.append((prev, max(prev, min(end, len(text)))))
        prev = offsets[-1][1]
    return ids, offsets


def _occurrences(text: str, sub: str) -> list[int]:
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
    starts = _occurrences(prompt, subject)
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
    ids, offsets = _char_offsets(spec, prompt)
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


@dataclass(frozen=True)
class Batch:
    """Right-padded token rows. Causal models never let a real token see a later pad, so reading
    each row at `last_pos` gives exactly what the unpadded row would."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, "batch"]
    last_pos: Int[Tensor, "batch"] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "last_pos", self.lengths - 1)


def pad_batch(rows: Sequence[Sequence[int] | Tensor], pad_id: int = 0) -> Batch:
    """Stack token rows of different lengths, padding on the right."""
    if len(rows) == 0:
        raise InvalidArgumentError("Cannot batch zero prompts; pass at least one.")
    lists = [r.tolist() if isinstance(r, Tensor) else list(r) for r in rows]
    if any(len(r) == 0 for r in lists):
        raise InvalidArgumentError("A prompt tokenized to zero tokens; remove empty prompts.")
    width = max(len(r) for r in lists)
    tokens = torch.full((len(lists), width), pad_id, dtype=torch.long)
    for i, r in enumerate(lists):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(tokens, torch.tensor([len(r) for r in lists], dtype=torch.long))


def batch_prompts(model: Any, prompts: Iterable[str], prepend_bos: bool | None = None) -> Batch:
    """Tokenize and right-pad prompts; read each row's prediction at `batch.last_pos`."""
    spec = spec_for(model)
    rows = [encode(spec, p, prepend_bos) for p in prompts]
    too_long = [len(r) for r in rows if len(r) > spec.n_ctx]
    if too_long:
        raise PromptTooLongError(
            f"{len(too_long)} prompt(s) exceed the model's context of {spec.n_ctx} tokens "
            f"(longest {max(too_long)}); shorten them."
        )
    return pad_batch(rows, spec.pad_id)
