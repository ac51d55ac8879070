"""Tokenization rules: start tokens (BOS per model), target spaces, character offsets, padding.

Analyses never call the tokenizer themselves; they go through this module (and `kvmem.core.facts`
for subject spans) so that BOS handling and leading spaces are decided in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from kvmem.errors import EmptyTargetError, InvalidArgumentError, PromptTooLongError


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

    @property
    def sample_start_id(self) -> int | None:
        """The token free text is sampled from (ROME's prefixes, the model's own corpus, context
        before a prompt): the start token the model prepends, else end-of-text; None when the
        tokenizer has neither."""
        return self.bos_id if self.bos_id is not None else self.tokenizer.eos_token_id


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


def encode_raw(spec: TokenizerSpec, text: str) -> list[int]:
    """Token ids of `text` alone: no start token, no special tokens."""
    return list(spec.tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(model: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of `text`, with the model's start token unless `prepend_bos=False`."""
    spec = spec_for(model)
    ids = encode_raw(spec, text)
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
    prompt_ids = encode_raw(spec, prompt)
    joint = encode_raw(spec, prompt + target)
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        ids = joint[len(prompt_ids) :]
    else:
        ids = encode_raw(spec, target)
    if not ids:
        raise EmptyTargetError(f"Target {target!r} tokenizes to no tokens.")
    return ids


def char_offsets(spec: TokenizerSpec, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and each token's character span in it."""
    tok = spec.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: recover them by decoding growing prefixes.
    ids = encode_raw(spec, text)
    offsets, prev = [], 0
    for i in range(len(ids)):
        end = len(tok.decode(ids[: i + 1]))
        offsets.append((prev, max(prev, min(end, len(text)))))
        prev = offsets[-1][1]
    return ids, offsets


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
