"""One file format for every kvmem edit: safetensors holding the edit's tensors, with its metadata
(format, fingerprints, settings) and a checksum over both, so a damaged or foreign file is refused
rather than applied."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from kvmem.core.fingerprint import tensors_checksum
from kvmem.errors import CacheError, InvalidArgumentError


def write_edit_file(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str], *,
                    weights_fingerprint: str | None, backend: str | None) -> Path:
    """Write `tensors` and `meta` (plus the fingerprints the edit records, and the checksum) to `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = dict(meta)
    if weights_fingerprint is not None:
        meta["weights_fingerprint"] = weights_fingerprint
    if backend is not None:
        meta["backend"] = backend
    meta["checksum"] = tensors_checksum(tensors, json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_edit_file(path: str | Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata without the checksum, tensors) of an edit file; `CacheError` when it is unreadable
    or fails its checksum, `InvalidArgumentError` when there is no file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise InvalidArgumentError(f"No edit file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CacheError(f"Edit file {path} is unreadable ({type(e).__name__}); it is corrupt or not an edit.") from None
    checksum = meta.pop("checksum", None)
    if checksum != tensors_checksum(tensors, json.dumps(meta, sort_keys=True)):
        raise CacheError(f"Edit file {path} fails its checksum: it is corrupt (or not a kvmem edit); recompute it.")
    return meta, tensors
