"""One-time downloads of the public evaluation data into kvmem's cache, each checked.

`kvmem.datafiles.data_path` looks in the data folder (`$KVMEM_DATA`) first; a file the folder
lacks that has a canonical public source (`SOURCES`) is downloaded once into
`cache_root()/data/<name>` and read from there afterwards:

| name | source | check |
|---|---|---|
| `known_1000.json` | ROME's server, rome.baulab.info/data/dsets/ | sha256 and size |
| `counterfact/counterfact.json` (all 21,919 records) | ROME's server | record count (no pinned hash) |
| `pararel/data_all_allbags.json` | Hunter-DDM/knowledge-neurons on GitHub, pinned commit | sha256 and size |

docs/data.md says where each pin comes from and which files have no download. A download is
written to a temporary file beside its destination and renamed into place only once it checks
out, so an interrupted or wrong download never leaves a file that looks finished.
`$KVMEM_DATA_URL` replaces every source's base URL by one folder URL holding the data folder's
layout (a mirror, or a local server in the tests).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kvmem import config
from kvmem.errors import DataChecksumError, MissingDataError

URL_ENV = "KVMEM_DATA_URL"

# Seconds without an answer before a download counts as unreachable.
TIMEOUT_S = 30

ROME_DATA = "https://rome.baulab.info/data/dsets"
KN_COMMIT = "922dfd9e05ef55f46af078ba4bd334989a45a618"  # Hunter-DDM/knowledge-neurons main, 2022
KN_DATA = f"https://raw.githubusercontent.com/Hunter-DDM/knowledge-neurons/{KN_COMMIT}/data/PARAREL"


@dataclass(frozen=True)
class Source:
    """Where a data file comes from and how a download of it is checked: `sha256` and `size`
    when they are pinned, else `n_records` (the length of the JSON list)."""

    name: str  # its path in the data folder's layout
    url: str
    sha256: str | None = None
    size: int | None = None
    n_records: int | None = None


SOURCES = {s.name: s for s in (
    # sha256 and size of the project's copy, which came from ROME's compiled data set; that the
    # server's file is byte-identical is assumed (not checkable offline): a different file is refused.
    Source("known_1000.json", f"{ROME_DATA}/known_1000.json",
           sha256="61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a", size=343_229),
    # No copy of the full file to pin from: checked by its record count (ROME's paper: 21,919).
    Source("counterfact/counterfact.json", f"{ROME_DATA}/counterfact.json", n_records=21_919),
    # Byte-identical to the repository's blob at KN_COMMIT (git blob 6bed0210..., checked).
    Source("pararel/data_all_allbags.json", f"{KN_DATA}/data_all_allbags.json",
           sha256="9daf106796fbc37456cf4a13762e82791deaca00f3502691f80b3e42804eca4d", size=31_412_385),
)}


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a downloaded data file lives: `cache_root()/data/<name>`."""
    return config.cache_root(cache_dir) / "data" / name


def source_url(source: Source) -> str:
    """The URL a download reads: `$KVMEM_DATA_URL/<name>` when that is set, else the canonical one."""
    base = os.environ.get(URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{source.name}" if base else source.url


def cached_or_download(name: str, *, cache_dir=None, progress: bool | None = None) -> Path:
    """The cached copy of data file `name` (a key of `SOURCES`), downloaded first if absent.

    Raises `MissingDataError` (naming the URL, why it failed and `$KVMEM_DATA`) when the download
    fails, `DataChecksumError` when what arrived is not the pinned file (nothing is kept)."""
    source = SOURCES[name]
    path = cache_path(name, cache_dir)
    if path.is_file():
        return path
    url = source_url(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(name, path.parent, e) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        digest = _download(url, tmp, name, progress)
        _check(source, tmp, digest, url)
        os.replace(tmp, path)  # atomic: the cache holds whole, checked files only
    finally:
        tmp.unlink(missing_ok=True)
    return path


# what a failed or cut-off connection raises (an HTTP error is a URLError, a cut-off body IncompleteRead)
_NETWORK_ERRORS = (urllib.error.URLError, OSError, ValueError, http.client.HTTPException)


def _download(url: str, dest: Path, name: str, progress: bool | None) -> str:
    """Stream `url` into `dest`; returns the sha256 of what arrived. The network's failures and the
    cache's (a full disk, a folder that cannot be written) are told apart: each names what to change."""
    h = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except _NETWORK_ERRORS as e:
        raise _offline(name, url, e) from None
    with response:
        try:
            out = dest.open("wb")
        except OSError as e:
            raise _unwritable(name, dest.parent, e) from None
        total = response.headers.get("Content-Length")
        with out, tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"downloading {name}", disable=not config.show_progress(progress)) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except _NETWORK_ERRORS as e:
                    raise _offline(name, url, e) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _unwritable(name, dest.parent, e) from None
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def _offline(name: str, url: str, e: BaseException) -> MissingDataError:
    reason = getattr(e, "reason", None) or e
    return MissingDataError(
        f"Could not download {name} from {url} ({reason}). Offline, set {_data_env()} to a folder holding "
        f"{name} (or pass a path to the file); {URL_ENV} points downloads at a mirror.")


def _unwritable(name: str, folder: Path, e: OSError) -> MissingDataError:
    return MissingDataError(
        f"Could not save the download of {name} in kvmem's cache {folder} ({e.strerror or e}). Set KVMEM_CACHE "
        f"to a writable folder with room for it, or {_data_env()} to a folder holding {name}.")


def _check(source: Source, path: Path, digest: str, url: str) -> None:
    problems = []
    if source.size is not None and path.stat().st_size != source.size:
        problems.append(f"{path.stat().st_size} bytes, expected {source.size}")
    if source.sha256 is not None and digest != source.sha256:
        problems.append(f"sha256 {digest}, expected {source.sha256}")
    if source.n_records is not None:
        try:
            n = len(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            n = None
        if n != source.n_records:
            problems.append(f"{'not a JSON list' if n is None else f'{n} records'}, expected {source.n_records}")
    if problems:
        raise DataChecksumError(
            f"The download of {source.name} from {url} is not the expected file ({'; '.join(problems)}); it was "
            f"not kept. Check the URL ({URL_ENV} overrides it), or set {_data_env()} to a folder holding your copy.")


def _data_env() -> str:
    from kvmem.datafiles import DATA_ENV

    return DATA_ENV


__all__ = ["SOURCES", "Source", "URL_ENV", "cache_path", "cached_or_download", "source_url"]
