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

from kvmem.errors import InvalidArgumentError, KvmemError

FORMAT = "kvmem-run/1"


class RunLogError(KvmemError):
    """A run log that cannot be resumed with these settings (or is not a run log)."""


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

    def __init__(self, path: str | os.PathLike, settings: dict, restart: bool = False):
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
