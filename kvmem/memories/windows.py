"""The corpus as batches of fixed-length windows, the input every corpus-streaming memory analysis
(`top_contexts`, `composition_stats`) runs the model on.

Documents are tokenized through `kvmem.core.tokenize` (no start token), joined with a separator
(the tokenizer's EOS, then the model's BOS when it uses one) and cut into fixed-length windows;
each window starts with the model's start token, so every window is a well-formed input and no
compute is spent on padding (only the corpus's final window is padded). The start token,
separators and padding are marked invalid (`WindowBatch.valid`): they are never analysed. Each
position's next token is read across window boundaries (-1 only at the very end of the corpus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from kvmem.core.tokenize import encode, spec_for
from kvmem.data import ensure_nonempty, read_corpus
from kvmem.errors import InvalidArgumentError
from kvmem.memories._common import check_k

Corpus = str | Path | Iterable[str]


@dataclass(frozen=True)
class WindowBatch:
    """Consecutive windows of the token stream, right-padded (only the corpus's last window)."""

    tokens: Int[Tensor, "batch pos"] = field(repr=False)
    next_tokens: Int[Tensor, "batch pos"] = field(repr=False)  # the stream's next token after each position; -1 unknown
    valid: Bool[Tensor, "batch pos"] = field(repr=False)  # text tokens (not start token, separator or padding)
    first_row: int  # index of the first window in the stream
    n_tokens: int  # text and separator tokens in this batch (start tokens and padding excluded)


def special_ids(model) -> tuple[int, ...]:
    """The start token and document separators kvmem inserts between documents."""
    spec = spec_for(model)
    out = []
    eos = getattr(spec.tokenizer, "eos_token_id", None)
    if eos is not None:
        out.append(int(eos))
    if spec.prepends_bos and spec.bos_id is not None and int(spec.bos_id) not in out:
        out.append(int(spec.bos_id))
    return tuple(out)


def _separator(model) -> list[int]:
    return list(special_ids(model))


def corpus_windows(
    model,
    corpus: Corpus,
    *,
    window: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> Iterator[WindowBatch]:
    """The corpus as batches of fixed-length windows (start token + `window - 1` stream tokens).

    `max_tokens` caps the stream tokens read (start tokens not counted). Raises on an empty corpus.
    """
    spec = spec_for(model)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise InvalidArgumentError(f"window must be an int >= 2, got {window!r}.")
    if window > spec.n_ctx:
        raise InvalidArgumentError(f"window={window} exceeds the model's context of {spec.n_ctx}; pass a smaller one.")
    check_k(batch_size, "batch_size")
    if max_tokens is not None:
        check_k(max_tokens, "max_tokens")
    bos = spec.bos_id if spec.prepends_bos else None
    L = window - (1 if bos is not None else 0)
    sep = _separator(model)
    special = set(sep) | ({bos} if bos is not None else set())

    def rows() -> Iterator[tuple[list[int], list[int]]]:
        buf: list[int] = []
        p = 0  # read position in buf
        used = 0
        started = False
        budget = max_tokens if max_tokens is not None else float("inf")
        for doc in ensure_nonempty(read_corpus(corpus)):
            ids = encode(spec, doc, prepend_bos=False)
            if not ids:
                continue
            if started:
                buf.extend(sep)
            started = True
            buf.extend(ids)
            while True:
                n = int(min(L, budget - used))
                if len(buf) - p < n + 1:
                    break
                yield buf[p : p + n], buf[p + 1 : p + n + 1]
                p += n
                used += n
                if used >= budget:
                    return
            if p > 1 << 16:
                del buf[:p]
                p = 0
        if not started:
            raise InvalidArgumentError(
                "The corpus produced no tokens; pass a text file or strings with some text in them."
            )
        while p < len(buf) and used < budget:
            n = int(min(L, budget - used, len(buf) - p))
            nxt = buf[p + 1 : p + n + 1]
            yield buf[p : p + n], nxt + [-1] * (n - len(nxt))
            p += n
            used += n

    pending: list[tuple[list[int], list[int]]] = []
    row_index = 0

    def make(batch: list[tuple[list[int], list[int]]], first: int) -> WindowBatch:
        tokens = torch.full((len(batch), window), spec.pad_id, dtype=torch.long)
        nexts = torch.full((len(batch), window), -1, dtype=torch.long)
        valid = torch.zeros((len(batch), window), dtype=torch.bool)
        off = 1 if bos is not None else 0
        n_tok = 0
        for i, (content, nxt) in enumerate(batch):
            if bos is not None:
                tokens[i, 0] = bos
                nexts[i, 0] = content[0]
            c = torch.tensor(content, dtype=torch.long)
            tokens[i, off : off + len(content)] = c
            nexts[i, off : off + len(content)] = torch.tensor(nxt, dtype=torch.long)
            valid[i, off : off + len(content)] = True
            n_tok += len(content)
        for s in special:
            valid &= tokens != s
        return WindowBatch(tokens, nexts, valid, first, n_tok)

    for row in rows():
        pending.append(row)
        if len(pending) == batch_size:
            yield make(pending, row_index)
            row_index += len(pending)
            pending = []
    if pending:
        yield make(pending, row_index)


__all__ = ["Corpus", "WindowBatch", "corpus_windows", "special_ids"]
