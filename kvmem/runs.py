"""Resumable batch runs: one JSON line per finished item, so an interrupted run continues where
it stopped instead of redoing finished items.

A log file starts with a header line holding the run's settings; reopening it with different
settings raises (mixing results of two settings in one average would be silently wrong). Each
finished item is one line written, flushed and fsynced at once; a line cut off by an interruption
is dropped on reopening (and the file truncated to its last whole line), so at most the item being
computed when the run stopped is redone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from kvmem.errors import InvalidArgumentError, RunLogError

FORMAT = "kvmem-run/1"


def _jsonable(value: Any) -> Any:
    # Round-trip through JSON so tuples, numpy scalars etc. compare equal to what is read back.
    return json.loads(json.dumps(value, default=float))


class RunLog:
    """Append-only log of finished items of one batch run, keyed by a string per item.

    >>> log = RunLog(path, settings={"model": "factworld", "samples": 10})
    >>> for key, item in items:
    ...     if key in log: continue
    ...     log.add(key, compute(item))
    >>> records = log.records()   # {key: record}, in the order they finished
    """

    def __init__(self, path: str | os.PathLike, settings: dict, *, restart: bool = False):
        self.path = Path(path)
        self.settings = _jsonable(settings)
        self._records: dict[str, dict] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLogError(f"Cannot create the folder for the run log {self.path}: {e}. Choose a writable --out.") from e
        if restart and self.path.exists():
            self.path.unlink()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume()
        else:
            self._write_lines([{"format": FORMAT, "settings": self.settings}], mode="w")

    def _resume(self) -> None:
        raw = self.path.read_bytes()
        whole = raw[: raw.rfind(b"\n") + 1]
        lines = whole.decode("utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not header or header.get("format") != FORMAT:
            raise RunLogError(f"{self.path} is not a kvmem run log; remove it or choose another output path.")
        if header["settings"] != self.settings:
            changed = sorted(
                k for k in set(header["settings"]) | set(self.settings)
                if header["settings"].get(k) != self.settings.get(k)
            )
            raise RunLogError(
                f"{self.path} was started with other settings (differing: {', '.join(changed)}). "
                "Rerun with the same settings to resume, or pass restart=True (--restart) to start over."
            )
        for n, line in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunLogError(f"{self.path} line {n} is corrupt ({e}); remove the line or restart.") from e
            self._records[entry["key"]] = entry["record"]
        if len(whole) != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))

    def _write_lines(self, entries: list[dict], mode: str = "a") -> None:
        try:
            with open(self.path, mode, encoding="utf-8") as f:
                for e in entries:
                    f.write(json.dumps(e, default=float) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunLogError(f"Cannot write the run log {self.path}: {e}. Choose a writable --out.") from e

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __getitem__(self, key: str) -> dict:
        return self._records[key]

    def __len__(self) -> int:
        return len(self._records)

    def add(self, key: str, record: dict) -> None:
        if key in self._records:
            raise InvalidArgumentError(f"Item {key!r} is already in {self.path}; keys must be unique.")
        record = _jsonable(record)
        self._write_lines([{"key": key, "record": record}])
        self._records[key] = record

    def records(self) -> dict[str, dict]:
        return dict(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file via a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunLogError(f"Cannot write {path}: {e}. Choose a writable output folder.") from e


# --- splitting one run over several processes or machines -------------------------------------

def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 ≤ I < N) → (I, N); None → None. Shard I of N takes items I, I+N, I+2N, ..."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise InvalidArgumentError(f"Shard {spec!r} is not of the form I/N (e.g. 0/4 for the first of four).") from None
    if n < 1 or not 0 <= i < n:
        raise InvalidArgumentError(f"Shard {spec!r}: need I/N with N ≥ 1 and 0 ≤ I < N.")
    return i, n


def take_shard(items: list, shard: tuple[int, int] | None) -> list:
    """The items of one shard (every N-th, starting at I), or all items when `shard` is None."""
    return list(items) if shard is None else list(items)[shard[0]::shard[1]]


def shard_path(path: str | os.PathLike, shard: tuple[int, int] | None) -> Path:
    """Where shard I of N logs: ``x.jsonl`` → ``x.shard<I>of<N>.jsonl`` (unchanged without a shard)."""
    path = Path(path)
    if shard is None:
        return path
    return path.with_name(f"{path.stem}.shard{shard[0]}of{shard[1]}{path.suffix}")


def merge_run_logs(parts: list[str | os.PathLike], dest: str | os.PathLike) -> int:
    """Join the run logs of the shards of one run into one log at `dest`; returns its item count.

    All parts must hold the same settings (else `RunLogError`: they are not one run). An item
    computed more than once (a shard rerun after a resume, say) keeps its first record: `dest`'s
    own items first, then the parts in order (records differ only in their timings). `dest` may
    already hold items of the same run: they are kept. Written atomically.
    """
    logs: list[tuple[Path, dict, dict[str, dict]]] = []
    paths = [Path(p) for p in parts]
    if Path(dest).exists() and Path(dest).stat().st_size > 0:
        paths = [Path(dest)] + [p for p in paths if p.resolve() != Path(dest).resolve()]
    for p in paths:
        if not p.exists():
            raise RunLogError(f"Run log {p} does not exist; check the shard paths.")
        header = _read_header(p)
        log = RunLog(p, header["settings"])
        logs.append((p, log.settings, log.records()))
    if not logs:
        raise InvalidArgumentError("merge_run_logs needs at least one run log.")
    settings = logs[0][1]
    merged: dict[str, dict] = {}
    for p, s, recs in logs:
        if s != settings:
            changed = sorted(k for k in set(s) | set(settings) if s.get(k) != settings.get(k))
            raise RunLogError(f"{p} and {logs[0][0]} hold different runs (settings differ: {', '.join(changed)}); "
                              "they cannot be merged.")
        for k, r in recs.items():
            merged.setdefault(k, r)
    write_run_log(dest, settings, merged)
    return len(merged)


def write_run_log(path: str | os.PathLike, settings: dict, records: dict[str, dict]) -> None:
    """Write a whole run log at once (atomically): the header with `settings`, then `records` in
    order. For tools that build a log from other files (merging shards, upgrading an older format)."""
    lines = [{"format": FORMAT, "settings": settings}] + [{"key": k, "record": r} for k, r in records.items()]
    write_atomic(path, "".join(json.dumps(e, default=float) + "\n" for e in lines))


def _read_header(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RunLogError(f"{path} is not a kvmem run log; check the path.")
    return header


def logged_keys(path: str | os.PathLike) -> set[str]:
    """The keys of the items a run log holds (none if it does not exist); reads whole lines only."""
    path = Path(path)
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keys = set()
    for line in raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()[1:]:
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def log_settings(path: str | os.PathLike) -> dict:
    """The settings a run log was started with (its header)."""
    return _read_header(Path(path))["settings"]
