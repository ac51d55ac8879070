"""Text the model writes itself: the default corpus of ROME's key statistics on a real model.

ROME estimates C = E[k kᵀ] over Wikipedia. A user without a corpus still needs C, and a corpus
that needs no download is the model's own text: seeded samples from the start token, top-k
sampling at temperature 1. The keys of its own text come from the distribution the model was
trained to produce, so C stays well conditioned; what this costs in the edit's specificity (NS)
against a Wikipedia C is measured by `benchmarks/bench_samples_corpus.py`
(benchmarks/results/editing/samples_corpus.md).

The samples are cached as text under `cache_root()/samples/`, keyed by the model's fingerprint
and the sampling settings, so the demo samples once per model and its statistics cache (keyed by
the token ids) is found again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvmem import config
from kvmem.core.fingerprint import model_fingerprint
from kvmem.core.tokenize import spec_for
from kvmem.editing.generate import sample_tokens
from kvmem.errors import CacheError, InvalidArgumentError

# Corpus name meaning "the model's own samples" (CLI `--corpus samples`, `four_views(corpus=...)`).
SAMPLES = "samples"

# Top-k of the samples: wide enough for varied text (ROME's context prefixes use 5, which repeats
# itself over thousands of tokens), narrow enough to avoid the long tail of junk tokens.
SAMPLE_TOP_K = 50
# Tokens per sample and samples per batched decoding pass.
SAMPLE_LENGTH = 128
SAMPLE_ROWS = 32
# Re-tokenizing decoded text does not give back exactly the sampled tokens: sample a margin more.
MARGIN = 1.15

FORMAT_VERSION = "1"


def model_samples(
    model,
    n_tokens: int,
    *,
    seed: int = 0,
    length: int = SAMPLE_LENGTH,
    top_k: int = SAMPLE_TOP_K,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[str]:
    """About `n_tokens` tokens of text sampled from `model` (seeded), as `length`-token documents
    that start from the model's start token; read from the cache when they were sampled before.

    Returns the documents as strings: a corpus for `second_moment`. `seed` fixes the samples
    (bit-identical reruns on the same machine and thread count); `top_k` and `length` as above."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise InvalidArgumentError(f"n_tokens must be a positive int, got {n_tokens!r}.")
    if length < 2 or length >= int(model.cfg.n_ctx):
        raise InvalidArgumentError(f"length must be in [2, {int(model.cfg.n_ctx) - 1}] (the model's context), "
                                   f"got {length}.")
    spec = spec_for(model)
    start = spec.sample_start_id
    if start is None:
        raise InvalidArgumentError("The model's tokenizer has neither a start nor an end-of-text token to "
                                   "sample from; pass a corpus instead.")
    n_docs = math.ceil(n_tokens * MARGIN / length)
    key = f"{model_fingerprint(model)[:20]}_n{n_docs}x{length}_k{top_k}_s{seed}"
    path = config.cache_root(cache_dir) / "samples" / f"{key}.json"
    if path.exists():
        return _load(path, key)

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([start])
    docs: list[str] = []
    bar = tqdm(total=n_docs * length, unit="tok", desc="sampling text from the model",
               disable=not config.show_progress(progress))
    while len(docs) < n_docs:
        rows = min(SAMPLE_ROWS, n_docs - len(docs))
        tokens = sample_tokens(model, prompt, rows, length, top_k=top_k, generator=gen)
        docs += [spec.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]
        bar.update(rows * length)
    bar.close()
    _save(path, key, docs)
    return docs


def _checksum(docs: list[str]) -> str:
    return hashlib.sha256(json.dumps(docs, ensure_ascii=False).encode()).hexdigest()


def _save(path: Path, key: str, docs: list[str]) -> None:
    from kvmem.models.cache import write_json_atomic  # a reader never sees half a file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"format": FORMAT_VERSION, "key": key, "sha256": _checksum(docs), "docs": docs})
    except OSError as e:
        raise CacheError(f"Cannot cache the model samples in {path.parent} ({e.strerror or e}); set KVMEM_CACHE "
                         "(or cache_dir) to a writable folder.") from None


def _load(path: Path, key: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        docs = data["docs"]
        ok = data.get("key") == key and data.get("sha256") == _checksum(docs)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CacheError(f"The cached model samples {path} are corrupt or belong to other settings; delete the file "
                         "and they are sampled again.")
    return docs


__all__ = ["SAMPLES", "SAMPLE_TOP_K", "model_samples"]
