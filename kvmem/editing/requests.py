"""Screening a batch of edit requests before any computation: conflicts refused, duplicates skipped.

Two requests edit the same fact when subject and relation agree (without `relation_id`: subject
and prompt). Same `target_new`: a duplicate, skipped and reported. Another `target_new`: a
conflict, refused with `DuplicateRequestError` naming both indices (no edit could satisfy both).
"""

from __future__ import annotations

from typing import Sequence

from kvmem.core.facts import Fact
from kvmem.errors import DuplicateRequestError, InvalidArgumentError


def request_key(f: Fact) -> tuple[str, str]:
    """What identifies the fact a request edits: (subject, relation_id or prompt)."""
    return (f.subject, f.relation_id if f.relation_id is not None else f.prompt)


def screen_requests(requests: Sequence[Fact], *, earlier: dict[tuple[str, str], str] | None = None
                    ) -> tuple[list[int], list[dict]]:
    """(indices to edit, [{"index", "subject", "skipped": reason}] for duplicates). `earlier`:
    request_key → target_new of facts already edited (a session's), checked the same way."""
    first: dict[tuple[str, str], int] = {}
    keep, skipped, conflicts = [], [], []
    for i, f in enumerate(requests):
        if not isinstance(f, Fact):
            raise InvalidArgumentError(f"Request {i} is a {type(f).__name__}, not a kvmem.Fact with target_new.")
        new = f.target("new").strip()  # EmptyTargetError when missing
        key = request_key(f)
        if earlier is not None and key in earlier:
            if earlier[key].strip() == new:
                skipped.append({"index": i, "subject": f.subject, "skipped": "duplicate of an edit made earlier in this session"})
            else:
                conflicts.append(f"request {i} ({f.subject!r}, {key[1]!r}) asks {f.target_new!r} but an earlier edit "
                                 f"of this session wrote {earlier[key]!r}")
            continue
        if key in first:
            j = first[key]
            if requests[j].target_new.strip() == new:
                skipped.append({"index": i, "subject": f.subject, "skipped": f"duplicate of request {j}"})
            else:
                conflicts.append(f"requests {j} and {i} ({f.subject!r}, {key[1]!r}) ask for "
                                 f"{requests[j].target_new!r} and {f.target_new!r}")
            continue
        first[key] = i
        keep.append(i)
    if conflicts:
        raise DuplicateRequestError(
            f"{len(conflicts)} conflicting request(s): " + "; ".join(conflicts[:5]) + ("; …" if len(conflicts) > 5 else "")
            + ". One fact cannot take two new objects: remove one of each pair."
        )
    return keep, skipped


__all__ = ["screen_requests", "request_key"]
