"""The serial executor: every item in this process, one after another, on the driver's own model
(`Work.local`) - what kvmem's batch runs always did."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from kvmem.executors.run import Outcome, outcome_of


class SerialExecutor:
    workers = 1

    def map(self, work, items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Outcome]]:
        """(key, outcome) of each item, in order, as each finishes."""
        state = work.local_state()
        for key, item in items:
            yield key, outcome_of(work.compute, state, item)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "SerialExecutor()"
