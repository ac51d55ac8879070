"""Second moments of MLP keys over ordinary text: ROME's C = E[k kᵀ], computed once and cached.

The keys are the `hook_post` activations of one layer (for gated MLPs act(gate)·in), i.e. the
inputs of `W_out`. C is uncentred, as ROME uses it. Every non-start token of the corpus counts
once; the start token (BOS) is left out: it is an attention-sink state no fact is ever read
from, and in models like Gemma its keys are orders of magnitude larger than any other's.

Cache files are keyed by the model fingerprint (a hash of every weight), the layer, the corpus
fingerprint (a hash of the exact token ids used) and the token count, so a stale file is never
found; each file carries a checksum of its contents, so a corrupt one raises `CacheError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kvmem.core.backend import run_to_layer
from kvmem import config
from kvmem.config import cache_root
from kvmem.data import ensure_nonempty, read_corpus
from kvmem.core.fingerprint import model_fingerprint, tensors_checksum
from kvmem.errors import CacheError, InvalidArgumentError, ModelMismatchError, SingularStatisticsError
from kvmem.core.hooks import capture
from kvmem.core.tokenize import encode, pad_batch, spec_for
from kvmem.core.weights import check_layer, hook_post_name

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class SecondMoment:
    """C = mean of k kᵀ over `n_tokens` keys of `layer` (float64), and how it converged.

    `tokens_seen[i]` / `rel_change[i]`: ‖C_i − C_{i−1}‖_F / ‖C_i‖_F between consecutive
    checkpoints of the running mean. `eigmin`/`eigmax` are C's extreme eigenvalues.
    """

    layer: int
    C: Float[Tensor, "d_mlp d_mlp"] = field(repr=False)
    n_tokens: int
    model_fingerprint: str
    corpus_fingerprint: str
    tokens_seen: Int[Tensor, "checkpoint"] = field(repr=False)
    rel_change: Float[Tensor, "checkpoint"] = field(repr=False)
    eigmin: float
    eigmax: float
    seconds: float = float("nan")
    path: str | None = None
    from_cache: bool = False
    _chol: list = field(default_factory=list, repr=False, compare=False)

    @property
    def d_mlp(self) -> int:
        return int(self.C.shape[0])

    @property
    def condition_number(self) -> float:
        return self.eigmax / self.eigmin if self.eigmin > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds and not math.isnan(self.seconds) else float("nan")

    def check_invertible(self, rcond: float = 1e-12) -> None:
        """Raise `SingularStatisticsError` if C is not safely positive definite."""
        check_invertible(self.C, rcond, n_tokens=self.n_tokens)

    def solve(self, k: Float[Tensor, "d_mlp"]) -> Float[Tensor, "d_mlp"]:
        """C⁻¹ k in float64 (Cholesky, computed once per object)."""
        if not self._chol:
            self.check_invertible()
            self._chol.append(torch.linalg.cholesky(self.C))
        L = self._chol[0]
        return torch.cholesky_solve(k.to(L).reshape(-1, 1), L)[:, 0]

    def convergence(self):
        """Relative change of C between checkpoints, as a DataFrame (tokens_seen, rel_change)."""
        import pandas as pd

        return pd.DataFrame({"tokens_seen": self.tokens_seen.tolist(), "rel_change": self.rel_change.tolist()})


# Tensors already found invertible: (weak reference, version counter, rcond) by id. Sequential
# edits pass the same C to every edit; its eigenvalues (~0.5 s for d_mlp 2048) need computing once.
# In-place changes bump the version counter and force a new check (writes through `.data` or a
# NumPy view do not: do not change C that way). Inference-mode tensors have no counter: never memoised.
_INVERTIBLE: dict[int, tuple[weakref.ref, int, float]] = {}


def check_invertible(C: Tensor, rcond: float = 1e-12, n_tokens: int | None = None) -> None:
    """Raise `SingularStatisticsError` unless C is finite, symmetric positive definite and not
    numerically singular (smallest eigenvalue > rcond × largest)."""
    memo = not C.is_inference()
    seen = _INVERTIBLE.get(id(C)) if memo else None
    if seen is not None and seen[0]() is C and seen[1] == C._version and seen[2] == rcond:
        return
    hint = (
        f" It was estimated from {n_tokens} tokens for {C.shape[0]} dimensions; use many more tokens "
        "than d_mlp (n_tokens ≥ 50 × d_mlp is a good start) or pass another corpus."
        if n_tokens is not None
        else ""
    )
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise InvalidArgumentError(f"Statistics must be a square [d_mlp, d_mlp] matrix, got shape {tuple(C.shape)}.")
    if not torch.isfinite(C).all():
        raise SingularStatisticsError("The statistics matrix C contains NaN or inf values." + hint)
    eig = torch.linalg.eigvalsh(C.double())
    if eig[-1] <= 0 or eig[0] <= rcond * eig[-1]:
        raise SingularStatisticsError(
            f"The statistics matrix C is singular (eigenvalues {eig[0].item():.3g} .. {eig[-1].item():.3g}), "
            "so C⁻¹k is undefined." + hint
        )
    if not memo:
        return
    if len(_INVERTIBLE) > 256:  # drop entries whose tensors are gone
        for k in [k for k, v in _INVERTIBLE.items() if v[0]() is None]:
            del _INVERTIBLE[k]
    _INVERTIBLE[id(C)] = (weakref.ref(C), C._version, rcond)


def checked_statistics(stats, layer: int, d_mlp: int, *, fingerprint: str | None, invertible: bool) -> Tensor:
    """C of edit layer `layer` as float64, after the checks every editor makes: a `SecondMoment`
    must be of that layer and (when `fingerprint` is given) of those weights (`ModelMismatchError`);
    a tensor must be [d_mlp, d_mlp]; with `invertible`, C must be safely positive definite
    (`SingularStatisticsError`: ROME's C⁻¹k*, MEMIT's λC + KᵀK; AlphaEdit's null space needs none)."""
    if isinstance(stats, SecondMoment):
        if stats.layer != layer:
            raise InvalidArgumentError(f"stats are for layer {stats.layer} but the edit goes to layer {layer}.")
        if fingerprint is not None and stats.model_fingerprint != fingerprint:
            raise ModelMismatchError(
                f"The statistics for layer {layer} were computed for other model weights (fingerprint mismatch); "
                "recompute them with second_moment(model, layer, corpus) on this (unedited) model."
            )
        if invertible:
            stats.check_invertible()
        return stats.C.double()
    if isinstance(stats, Tensor):
        if tuple(stats.shape) != (d_mlp, d_mlp):
            raise ModelMismatchError(f"stats for layer {layer} must be a [{d_mlp}, {d_mlp}] tensor for this model, "
                                     f"got {tuple(stats.shape)}.")
        if invertible:
            check_invertible(stats)
        return stats.double()
    raise InvalidArgumentError(f"stats for layer {layer} must be a SecondMoment or a tensor, got {type(stats).__name__}.")


# --- the corpus as token rows -------------------------------------------------------------

def corpus_token_rows(model, corpus, n_tokens: int, max_len: int) -> tuple[list[list[int]], int, bool]:
    """Token rows (start token first, at most max_len long) holding exactly n_tokens non-start
    tokens, or all the corpus has. Returns (rows, counted tokens, whether BOS is row[0])."""
    spec = spec_for(model)
    has_bos = spec.bos_id is not None
    docs: Iterator[str] = ensure_nonempty(read_corpus(corpus))
    rows, total = [], 0
    for doc in docs:
        ids = encode(spec, doc)[:max_len]
        body = len(ids) - (1 if has_bos else 0)
        if body <= 0:
            continue
        if total + body > n_tokens:
            ids = ids[: len(ids) - (total + body - n_tokens)]
            body = n_tokens - total
        rows.append(ids)
        total += body
        if total >= n_tokens:
            break
    return rows, total, has_bos


def _corpus_fingerprint(rows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray([len(r)] + r, dtype=np.int64).tobytes())
    return h.hexdigest()


def length_batches(rows: list[list[int]], batch_tokens: int, window: int = 256) -> Iterator[list[list[int]]]:
    """Rows grouped so that rows × longest row ≤ batch_tokens; sorted by length within windows
    of `window` rows to limit padding."""
    for w in range(0, len(rows), window):
        chunk = sorted(rows[w : w + window], key=len)
        batch: list[list[int]] = []
        for r in chunk:
            if batch and (len(batch) + 1) * max(len(r), len(batch[-1])) > batch_tokens:
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch


def moment_chunks(rows: list[list[int]], batch_tokens: int, step: int, has_bos: bool) -> list[list[list[list[int]]]]:
    """The batches of `length_batches(rows, batch_tokens)` grouped into chunks that end where the
    running token count first reaches the next multiple of `step` past the last chunk's end (the
    convergence checkpoints), and at the last batch. A chunk is what one worker sums."""
    chunks, chunk, seen, next_check = [], [], 0, step
    batches = list(length_batches(rows, batch_tokens))
    for i, batch in enumerate(batches):
        chunk.append(batch)
        seen += sum(len(r) - (1 if has_bos else 0) for r in batch)
        if seen >= next_check or i == len(batches) - 1:
            chunks.append(chunk)
            chunk, next_check = [], seen + step
    return chunks


def batch_keys(model, layer: int, batches: Iterable[list[list[int]]]) -> Iterator[Tensor]:
    """Per batch of token rows: the keys (`hook_post` of `layer`, [n, d_mlp], the model's dtype and
    device) at every real token of every row, the start token left out. The one reading of a
    corpus's keys: C's sums (`chunk_moment`) and the interference corpus bank take them here."""
    spec = spec_for(model)
    has_bos = spec.bos_id is not None
    device = next(model.parameters()).device
    kept: dict[str, Tensor] = {}  # this batch's hook_post activations, kept by the hook
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_post_name(model, layer), capture(kept, "post"))]):
        for rows_b in batches:
            batch = pad_batch(rows_b, spec.pad_id)
            tokens = batch.tokens.to(device)
            run_to_layer(model, tokens, layer + 1)
            act = kept.pop("post")
            pos = torch.arange(tokens.shape[1], device=device)
            mask = pos[None, :] < batch.lengths.to(device)[:, None]
            if has_bos:
                mask[:, 0] = False
            yield act[mask]


def chunk_moment(layer: int, model, batches: list[list[list[int]]]) -> tuple[Tensor, int]:
    """(Σ KᵀK over the keys of `batches` in float64, the number of keys), on the model's device.
    Each batch's KᵀK is a float32 product (float64 for a float64 model); the start token is left out."""
    device = next(model.parameters()).device
    prod_dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    d_mlp = int(model.cfg.d_mlp)
    part = torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device)
    n = 0
    for K in batch_keys(model, layer, batches):
        K = K.to(prod_dtype)
        part += (K.T @ K).double()
        n += K.shape[0]
    return part, n


def _chunk_sums(model, layer: int, chunks: list, executor) -> Iterator[tuple[Tensor, int]]:
    """(chunk sum, keys) of every chunk, in chunk order: serially here, or on the executor's workers."""
    from functools import partial

    from kvmem.executors import Work, get_executor, model_setup, run_items

    executor = get_executor(executor)
    setup = model_setup(model, executor)
    if setup is None:  # serial: chunk by chunk, nothing held beyond the running sum
        for batches in chunks:
            yield chunk_moment(layer, model, batches)
        return
    done = run_items([(str(i), c) for i, c in enumerate(chunks)], Work(setup, partial(_cpu_chunk, layer)),
                     executor=executor)
    for i in range(len(chunks)):
        yield done[str(i)]


def _cpu_chunk(layer: int, model, batches) -> tuple[Tensor, int]:
    part, n = chunk_moment(layer, model, batches)
    return part.cpu(), n


# --- cache files ------------------------------------------------------------------------

def _cache_path(cache_dir: Path, model_fp: str, layer: int, corpus_fp: str, n_tokens: int) -> Path:
    return cache_dir / "stats" / f"mom2-{model_fp[:20]}-L{layer}-{corpus_fp[:20]}-{n_tokens}.safetensors"


def _save(path: Path, sm: SecondMoment) -> None:
    from safetensors.torch import save_file

    tensors = {"C": sm.C.contiguous(), "tokens_seen": sm.tokens_seen.contiguous(), "rel_change": sm.rel_change.contiguous()}
    meta = {
        "format": "kvmem.second_moment",
        "version": FORMAT_VERSION,
        "layer": str(sm.layer),
        "n_tokens": str(sm.n_tokens),
        "model_fingerprint": sm.model_fingerprint,
        "corpus_fingerprint": sm.corpus_fingerprint,
        "eigmin": repr(sm.eigmin),
        "eigmax": repr(sm.eigmax),
        "seconds": repr(sm.seconds),
    }
    meta["checksum"] = tensors_checksum(tensors, json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_second_moment(path: str | Path) -> SecondMoment:
    """Read a cached `SecondMoment`, verifying its checksum (CacheError if corrupt)."""
    from safetensors import safe_open

    path = Path(path)
    fix = f"Delete {path} (it is recomputed on the next call) or call second_moment(..., recompute=True)."
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CacheError(f"Statistics cache file {path} is unreadable ({type(e).__name__}: {e}). {fix}") from None
    checksum = meta.pop("checksum", None)
    if (
        meta.get("format") != "kvmem.second_moment"
        or set(tensors) != {"C", "tokens_seen", "rel_change"}
        or checksum != tensors_checksum(tensors, json.dumps(meta, sort_keys=True))
    ):
        raise CacheError(f"Statistics cache file {path} fails its checksum: it is corrupt. {fix}")
    return SecondMoment(
        layer=int(meta["layer"]),
        C=tensors["C"],
        n_tokens=int(meta["n_tokens"]),
        model_fingerprint=meta["model_fingerprint"],
        corpus_fingerprint=meta["corpus_fingerprint"],
        tokens_seen=tensors["tokens_seen"],
        rel_change=tensors["rel_change"],
        eigmin=float(meta["eigmin"]),
        eigmax=float(meta["eigmax"]),
        seconds=float(meta["seconds"]),
        path=str(path),
        from_cache=True,
    )


# --- the computation ----------------------------------------------------------------------

def second_moment(
    model,
    layer: int,
    corpus: str | Path | Iterable[str],
    *,
    n_tokens: int = config.STATS_TOKENS,
    max_len: int = 256,
    batch_tokens: int = 4096,
    n_checkpoints: int = 20,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    recompute: bool = False,
    progress: bool | None = None,
    executor=None,
) -> SecondMoment:
    """Uncentred second moment C = E[k kᵀ] of layer `layer`'s MLP keys (`hook_post`) over text.

    `corpus`: a text file, "wiki" (the offline Wikipedia summaries), a `.json` summaries file, or
    any iterable of strings (e.g. a streamed Hugging Face dataset). Documents are tokenized with
    the model's start token and cut at `max_len` tokens; the first `n_tokens` non-start tokens
    count. The forward pass stops after `layer` (no later layers, no unembedding). Each batch's
    KᵀK is a float32 product of at most `batch_tokens` keys, summed across batches in float64.

    Results are cached under `cache_dir` (else `$KVMEM_CACHE`, else `~/.cache/kvmem`) keyed by
    model fingerprint, layer, corpus fingerprint and `n_tokens`; `use_cache=False` neither reads
    nor writes, `recompute=True` overwrites. A corrupt cache file raises `CacheError`.
    `progress`: a bar over the tokens (None: `kvmem.config.PROGRESS`).

    The corpus is summed in chunks, one per convergence checkpoint (`moment_chunks`): each chunk's
    KᵀK in float64, the chunks added in order. `executor` ("ray" or a `kvmem.executors` executor;
    default serial) computes the chunks on workers that load the model by its name; the chunks and
    their order are the same, so C is the same as the serial result.
    """
    layer = check_layer(model, layer)
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise InvalidArgumentError(f"n_tokens must be a positive int, got {n_tokens!r}.")
    if max_len < 2 or batch_tokens < max_len:
        raise InvalidArgumentError("Need max_len ≥ 2 and batch_tokens ≥ max_len.")
    max_len = min(max_len, int(model.cfg.n_ctx))
    rows, total, has_bos = corpus_token_rows(model, corpus, n_tokens, max_len)
    if total < n_tokens:
        warnings.warn(
            f"The corpus has only {total} tokens (asked for {n_tokens}); C is estimated from those.",
            stacklevel=2,
        )
    model_fp = model_fingerprint(model)
    corpus_fp = _corpus_fingerprint(rows)
    path = _cache_path(cache_root(cache_dir), model_fp, layer, corpus_fp, total)
    if use_cache and not recompute and path.exists():
        sm = load_second_moment(path)
        if (sm.model_fingerprint, sm.layer, sm.corpus_fingerprint, sm.n_tokens) != (model_fp, layer, corpus_fp, total):
            raise CacheError(f"Statistics cache file {path} belongs to another model, layer or corpus; delete it.")
        return sm

    d_mlp = int(model.cfg.d_mlp)
    device = next(model.parameters()).device
    C = torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device)
    step = max(1, total // max(1, n_checkpoints))
    # batches no larger than a checkpoint step, so that small runs still show convergence
    chunks = moment_chunks(rows, min(batch_tokens, max(step, max_len)), step, has_bos)
    seen = 0
    prev: Tensor | None = None
    checkpoints: list[int] = []
    changes: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, disable=not config.show_progress(progress), desc=f"C layer {layer}", unit="tok")
    for part, n in _chunk_sums(model, layer, chunks, executor):
        # chunks are summed in their order, whichever worker finished first: the same C every time
        C += part.to(device)
        seen += n
        bar.update(n)
        cur = C / seen
        if prev is not None:
            checkpoints.append(seen)
            changes.append(float((cur - prev).norm() / cur.norm().clamp_min(1e-300)))
        prev = cur
    bar.close()
    seconds = time.perf_counter() - start
    if seen == 0:
        raise InvalidArgumentError("The corpus yielded no tokens beyond the start token.")
    C = (C / seen).cpu()
    C = 0.5 * (C + C.T)  # exact symmetry (float sums of KᵀK already are, up to rounding)
    eig = torch.linalg.eigvalsh(C)
    sm = SecondMoment(
        layer=layer,
        C=C,
        n_tokens=seen,
        model_fingerprint=model_fp,
        corpus_fingerprint=corpus_fp,
        tokens_seen=torch.tensor(checkpoints, dtype=torch.long),
        rel_change=torch.tensor(changes, dtype=torch.float64),
        eigmin=float(eig[0]),
        eigmax=float(eig[-1]),
        seconds=seconds,
        path=str(path) if use_cache else None,
    )
    if use_cache:
        _save(path, sm)
    return sm
