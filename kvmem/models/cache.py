"""The on-disk cache of converted real models: folders, manifest, checksums and locks.

A model's cache is ``<cache root>/<model>/`` (the root from `kvmem.config.cache_root`): one
safetensors file per weight-processing variant (HookedTransformer only), the tokenizer, optionally
the dequantised Hugging Face checkpoint (``hf/``, all a TransformerBridge needs), and
``manifest.json`` recording the sha256 and size of every file, a fingerprint of the GGUF source and
the versions of the software that made it. Whether a manifest still fits the installed packages is
decided by `kvmem.models.real`, which knows the source.

Versions are recorded where they matter: the manifest's ``software`` (transformers, gguf: they make
the tokenizer and ``hf/``) covers the whole folder, and each HookedTransformer variant records the
TransformerLens version that processed it. So a TransformerLens 3 and a TransformerLens 4
environment share one cache without rebuilding it for each other; only a variant processed by
another TransformerLens version is redone (by TransformerLens 3, which alone reads variants).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from kvmem.config import cache_root
from kvmem.errors import CacheError
from kvmem.models.specs import model_spec

CACHE_FORMAT = 1


class CacheWarning(UserWarning):
    """A cached conversion was corrupt or stale and is being rebuilt."""


def model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/<model>/``, where a built-in model's converted weights are kept."""
    return cache_root(cache_dir) / model_spec(name).key


def variant_name(fold_ln: bool, center_writing_weights: bool, center_unembed: bool,
                 fold_value_biases: bool) -> str:
    """The name of one weight-processing variant (each is cached in a file of its own)."""
    flags = (("fold_ln", fold_ln), ("center_writing_weights", center_writing_weights),
             ("center_unembed", center_unembed), ("fold_value_biases", fold_value_biases))
    return "tl-" + "-".join(f"{k}{int(bool(v))}" for k, v in flags)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a model's cache folder (pytest-xdist workers, notebooks in parallel)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path, limit: int | None = None) -> str:
    """The sha256 of a file, or of its first `limit` bytes."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            block = f.read(8 * 1024 * 1024 if remaining is None else min(remaining, 8 * 1024 * 1024))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def distribution_version(dist: str) -> str | None:
    """The installed version of a pip distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """What a manifest records of the software that made a cache's tokenizer and Hugging Face
    checkpoint (a change makes the whole folder stale). TransformerLens is not among them: it only
    processes the HookedTransformer variants, each of which records its own version
    (`transformer_lens_version`)."""
    return {
        "kvmem_cache_format": str(CACHE_FORMAT),
        "transformers": distribution_version("transformers"),
        "gguf": distribution_version("gguf"),
    }


def same_software(recorded: Any) -> bool:
    """Whether a manifest's ``software`` fits the installed packages. Manifests written before the
    TransformerLens version moved into each variant also list ``transformer_lens``: ignored here
    (their variants are judged by `variant_software_ok`)."""
    if not isinstance(recorded, dict):
        return False
    return {k: v for k, v in recorded.items() if k != "transformer_lens"} == software_versions()


def transformer_lens_version() -> str | None:
    """The installed TransformerLens version (recorded in each HookedTransformer variant)."""
    return distribution_version("transformer-lens")


def variant_software_ok(manifest: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a cached HookedTransformer variant was processed by the installed TransformerLens
    (older entries lack the field: the manifest-level version of their time stands for it)."""
    made_by = entry.get("transformer_lens", (manifest.get("software") or {}).get("transformer_lens"))
    return made_by == transformer_lens_version()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's ``manifest.json``, None when there is none; `CacheError` when unreadable."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is unreadable ({e}).") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is not a JSON object.")
    return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no temporary file behind


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "size"}}`` for every file in `folder` (the manifest's records)."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir()) if p.is_file()
    }


def check_files(folder: Path, recorded: dict[str, Any], what: str, hash_contents: bool = True) -> None:
    """`CacheError` unless every recorded file is there with its size (and, with `hash_contents`,
    its sha256)."""
    if not isinstance(recorded, dict) or not recorded:
        raise CacheError(f"{what}: the manifest lists no files.")
    for fname, info in recorded.items():
        path = folder / fname
        if not path.is_file():
            raise CacheError(f"{what}: {path} is missing.")
        size = path.stat().st_size
        if size != info.get("size"):
            raise CacheError(f"{what}: {path} has {size} bytes, the manifest says {info.get('size')} "
                             "(truncated or replaced).")
        if hash_contents and sha256_file(path) != info.get("sha256"):
            raise CacheError(f"{what}: {path} fails its sha256 check (corrupt).")


def clear_folder(folder: Path) -> None:
    """Delete everything in a cache folder but its lock file (held by the caller)."""
    for child in folder.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def clear_cache(name: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Delete a model's cache folder (the next load converts from GGUF again)."""
    folder = model_cache_dir(name, cache_dir)
    with locked(folder):
        clear_folder(folder)
