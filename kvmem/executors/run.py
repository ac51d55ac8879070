"""`run_items`: compute the items of a batch run on an executor and stream each finished one into
the run log (`kvmem.runs.RunLog`) at once.

The log is the only state of a run: items already in it are not computed again, each finished
item is one fsynced line, and the log refuses a key twice. So a driver killed anywhere resumes
with nothing lost (every logged item stays) and nothing counted twice (a result that arrives for
an item already logged cannot be), and a summary read from the log by key does not depend on the
order in which workers finished.

Failures: an item whose computation kvmem rejects (a `KvmemError`: a bad record, a fact the model
cannot take) is an `ItemFailure`, handed to `on_failure` (log it as an error row, or raise):
running it again gives the same error, so it is never retried. A worker that dies (killed, out of
memory, its node lost) is the executor's business: Ray restarts it and hands the item to a worker
again, a bounded number of times (`RayExecutor.max_retries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from kvmem import errors
from kvmem.errors import KvmemError


@dataclass(frozen=True)
class ItemFailure:
    """An item whose computation raised a `KvmemError` (by its class name and message: it may come
    from another process)."""

    key: str
    error_type: str
    message: str
    error: BaseException | None = field(default=None, compare=False, repr=False)

    def exception(self) -> KvmemError:
        """The error itself when it came along, else again as its kvmem class (KvmemError if the
        class is not in kvmem.errors)."""
        if self.error is not None:
            return self.error
        cls = getattr(errors, self.error_type, None)
        if not (isinstance(cls, type) and issubclass(cls, KvmemError)):
            cls = KvmemError
        try:
            return cls(self.message)
        except TypeError:
            return KvmemError(self.message)

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


#: What computing one item gave: ("ok", result) or ("failed", ItemFailure with an empty key).
Outcome = tuple[str, Any]


def outcome_of(compute: Callable[[Any, Any], Any], state: Any, item: Any) -> Outcome:
    """compute(state, item) as an `Outcome`; a KvmemError becomes a failure, any other exception
    (a bug, not a bad item) propagates and stops the run."""
    try:
        return "ok", compute(state, item)
    except KvmemError as e:
        return "failed", ItemFailure("", type(e).__name__, str(e), e)


def run_items(
    items: Sequence[tuple[str, Any]],
    work,
    *,
    log=None,
    executor=None,
    on_failure: Callable[[ItemFailure], dict | None] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compute `work` for every (key, item) whose key `log` does not hold yet, on `executor` (None:
    serial), logging each result as it arrives; returns {key: result} of every item, the logged
    ones included, in the order of `items` (results of failed items left out).

    `on_failure(failure)`: what to log for an item kvmem rejected (None: log nothing), or raise to
    stop the run; default: raise the item's error. `on_done(key)` after each item (a progress bar).
    Without a log, results need not be JSON (tensors stay tensors) and nothing is resumable.
    """
    from kvmem.executors.select import get_executor

    executor = get_executor(executor)
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise errors.InvalidArgumentError("Two items of the run have the same key; keys must be unique.")
    results: dict[str, Any] = {k: log[k] for k in keys if log is not None and k in log}
    todo = [(k, x) for k, x in items if k not in results]
    stream: Iterable = executor.map(work, todo) if todo else ()
    try:
        for key, (status, value) in stream:
            if status == "failed":
                failure = ItemFailure(key, value.error_type, value.message, value.error)
                if on_failure is None:
                    raise failure.exception()  # the item's own error, as a serial run raises it
                value = on_failure(failure)
                if value is None:
                    continue
            if log is not None:
                log.add(key, value)
                value = log[key]
            results[key] = value
            if on_done is not None:
                on_done(key)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # an interrupted run stops its workers
    return {k: results[k] for k in keys if k in results}
