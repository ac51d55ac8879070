"""Screening a batch of edit requests before any computation: conflicts refused, duplicates skipped.

Two requests edit the same fact when subject and relation agree (without `relation_id`: subject
and prompt). Same `target_new`: a duplicate, skipped and reported. Another `target_new`: a
conflict, refused with `DuplicateRequestError` naming both indices (no edit could satisfy both).

`find_repeats` is the one scan; `screen_requests` (MEMIT, AlphaEdit, `EditSession`) and
`kvmem.pipelines.stress.check_requests` (sequential runs, which may also skip conflicts) word
its findings for their callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvmem.core.facts import Fact
from kvmem.errors import DuplicateRequestError, InvalidArgumentError


def request_key(f: Fact) -> tuple[str, str]:
    """What identifies the fact a request edits: (subject, relation_id or prompt)."""
    return (f.subject, f.relation_id if f.relation_id is not None else f.prompt)


@dataclass(frozen=True)
class Repeat:
    """Request `index` edits a fact already edited by request `first` (None: by an earlier edit,
    whose target was `earlier_target`); `same`: with the same target_new (a duplicate), else a
    conflict."""

    index: int
    first: int | None
    same: bool
    earlier_target: str | None = None


def find_repeats(requests: Sequence[Fact], *, earlier: dict[tuple[str, str], str] | None = None
                 ) -> tuple[list[int], list[Repeat]]:
    """(indices of the first request of each fact, the later ones as `Repeat`s). `earlier`:
    request_key → target_new of facts already edited (a session's); a request of one of those is
    a repeat too. Raises on a non-Fact or a request without target_new (`EmptyTargetError`)."""
    first: dict[tuple[str, str], int] = {}
    keep, repeats = [], []
    for i, f in enumerate(requests):
        if not isinstance(f, Fact):
            raise InvalidArgumentError(f"Request {i} is a {type(f).__name__}, not a kvmem.Fact with target_new.")
        new = f.target("new").strip()  # EmptyTargetError when missing
        key = request_key(f)
        if earlier is not None and key in earlier:
            repeats.append(Repeat(i, None, earlier[key].strip() == new, earlier[key]))
        elif key in first:
            repeats.append(Repeat(i, first[key], requests[first[key]].target_new.strip() == new))
        else:
            first[key] = i
            keep.append(i)
    return keep, repeats


def screen_requests(requests: Sequence[Fact], *, earlier: dict[tuple[str, str], str] | None = None
                    ) -> tuple[list[int], list[dict]]:
    """(indices to edit, [{"index", "subject", "skipped": reason}] for duplicates). `earlier`:
    request_key → target_new of facts already edited (a session's), checked the same way."""
    keep, repeats = find_repeats(requests, earlier=earlier)
    skipped, conflicts = [], []
    for r in repeats:
        f = requests[r.index]
        if r.same:
            why = ("duplicate of an edit made earlier in this session" if r.first is None
                   else f"duplicate of request {r.first}")
            skipped.append({"index": r.index, "subject": f.subject, "skipped": why})
        elif r.first is None:
            conflicts.append(f"request {r.index} ({f.subject!r}, {request_key(f)[1]!r}) asks {f.target_new!r} but "
                             f"an earlier edit of this session wrote {r.earlier_target!r}")
        else:
            conflicts.append(f"requests {r.first} and {r.index} ({f.subject!r}, {request_key(f)[1]!r}) ask for "
                             f"{requests[r.first].target_new!r} and {f.target_new!r}")
    if conflicts:
        raise DuplicateRequestError(
            f"{len(conflicts)} conflicting request(s): " + "; ".join(conflicts[:5]) + ("; …" if len(conflicts) > 5 else "")
            + ". One fact cannot take two new objects: remove one of each pair."
        )
    return keep, skipped


__all__ = ["screen_requests", "find_repeats", "Repeat", "request_key"]
