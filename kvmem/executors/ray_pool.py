"""The Ray executor: a pool of Ray actors, each loading the model once (`Work.setup`) and
computing items one at a time, on this machine or a Ray cluster.

Workers outlive a run: the next run on the same executor reuses them, and one with the same
setup (the same model) does not even load the model again; `close()` stops them.

Scheduling: every worker has at most `IN_FLIGHT` items queued (so it never waits for the driver
between items); results come back as they finish and go straight to the caller (`run_items`
logs them). A worker that dies (killed, out of memory, its node lost) is replaced by a new actor
and its items are queued again, each at most `max_retries` times; an item that only ever kills
its worker (one that exhausts memory, say) then stops the run with `ExecutorError` naming it.
An item that fails for its own reasons (a `KvmemError`) comes back as a failure and is not
retried. A worker that cannot set up (the model missing on its node, other weights than the
driver's) stops the run at once: every other worker would fail the same way.
"""

from __future__ import annotations

import hashlib
import os
import sys
import weakref
from collections import deque
from typing import Any, Iterable, Iterator

from kvmem.errors import ExecutorError, InvalidArgumentError, MissingDependencyError
from kvmem.executors.run import Outcome, outcome_of

#: Items queued on one worker at a time (one computing, one waiting).
IN_FLIGHT = 2


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "executor='ray' needs Ray: pip install 'kvmem[ray]' (or pip install ray)."
        ) from None
    return ray


class _Worker:
    """One Ray actor: the state of the work it was last given (built once by `prepare`), and one
    item at a time. It outlives a run, so the next run with the same setup (the same model)
    neither starts a process nor loads the model again."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.key, self.compute, self.state, self.setup_error = None, None, None, None

    def prepare(self, key: str, work: list) -> None:
        """Take the work (its object ref in a list, so that it is fetched here and a failure to
        unpickle it, e.g. code this node cannot import, becomes this worker's setup error)."""
        import ray

        try:
            setup, self.compute = ray.get(work[0])
        except Exception as e:
            self.key, self.compute, self.state, self.setup_error = key, None, None, f"{type(e).__name__}: {e}"
            return
        if key == self.key and self.setup_error is None:
            return  # the same setup as the last run's: its state (the loaded model) serves again
        self.key, self.state, self.setup_error = key, None, None
        try:
            self.state = setup()
        except Exception as e:  # reported by the first item, which then stops the run
            self.setup_error = f"{type(e).__name__}: {e}"

    def run(self, item: Any) -> Outcome:
        if self.setup_error is not None:
            return "setup-error", self.setup_error
        return outcome_of(self.compute, self.state, item)

    def pid(self) -> int:
        return os.getpid()


_ACTOR = None
#: Every RayExecutor of this process: an idle one's workers are stopped when another one needs
#: workers, else they would hold the cluster's CPUs (or GPU shares) and the new ones never start.
_EXECUTORS: "weakref.WeakSet[RayExecutor]" = weakref.WeakSet()


def _actor_class(ray):
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(_Worker)
    return _ACTOR


def connect(address: str | None = None, *, num_cpus: int | None = None):
    """Ray, connected: the Ray this process already joined; else `address` ("auto": the cluster this
    node belongs to; "ray://host:10001" or "host:6379": that cluster); else a local Ray started here
    with `num_cpus` (default: this machine's cores), whose workers import from the driver's import
    path (a script's own folder, a test folder), as the driver does."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            if address is None:
                path = os.pathsep.join(dict.fromkeys(p for p in sys.path if p and os.path.isdir(p)))
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
            else:
                ray.init(address=address, log_to_driver=False)
        except ConnectionError as e:
            raise ExecutorError(f"Cannot reach a Ray cluster at --address {address}: {e}. Start one with "
                                "`ray start --head` (docs/scaling.md) or leave --address out for a local Ray.") from None
    return ray


def _first_lines(e: Exception, n: int = 3) -> str:
    lines = [l.strip() for l in str(getattr(e, "error_msg", e)).splitlines() if l.strip()]
    return " / ".join(lines[-n:])


class _Pending:
    """The items waiting for a worker, in the order they go out. When a worker dies with several
    items unreturned (the one it ran, and one whose reply the death cut off), the earliest submitted
    is charged (`charge`). A charged item goes first and runs alone on its worker, so that its next
    run tells whether it was the cause; items taken back uncharged go next, in the order they were
    first submitted; then the rest, in input order."""

    def __init__(self, items: Iterable[tuple[str, Any]]):
        self._items = deque(items)
        self.tries: dict[str, int] = {}  # key -> deaths charged to it
        self._submitted: dict[str, int] = {}  # key of an item taken back uncharged -> its submission number

    def __len__(self) -> int:
        return len(self._items)

    def popleft(self) -> tuple[str, Any]:
        return self._items.popleft()

    def charge(self, key: str) -> None:
        self.tries[key] = self.tries.get(key, 0) + 1

    def may_submit(self, running: list[str]) -> bool:
        """Whether the next item may join a worker already running the items `running`."""
        if not self._items or len(running) >= IN_FLIGHT or any(k in self.tries for k in running):
            return False
        return not (running and self._items[0][0] in self.tries)

    def take_back(self, key: str, item: Any, number: int) -> None:
        """Requeue an item its dead worker did not return; `number`: when it was submitted."""
        if key in self.tries:
            self._items.appendleft((key, item))
            return
        self._submitted[key] = number
        lead = next((i for i, (k, _) in enumerate(self._items)
                     if k not in self.tries and self._submitted.get(k, number + 1) > number), len(self._items))
        self._items.insert(lead, (key, item))


class RayExecutor:
    """Items on Ray workers. `address`: see `connect`. `workers`: how many actors (default: as many
    as the cluster's CPUs, or GPUs when `gpus_per_worker` > 0, hold, and no more than items).
    `cpus_per_worker` (also the worker's torch threads), `gpus_per_worker` (fractions let several
    workers share one GPU: 0.1 puts ten on it). `max_retries`: how often one item may be handed to
    a new worker after its worker died."""

    def __init__(self, *, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, max_retries: int = 3):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}.")
        if not cpus_per_worker > 0 or gpus_per_worker < 0:
            raise InvalidArgumentError("cpus_per_worker must be > 0 and gpus_per_worker >= 0.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidArgumentError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.actors: list = []  # the live workers (a test kills one)
        self.restarts = 0
        self.running = False
        _EXECUTORS.add(self)

    def __getstate__(self) -> dict:
        # pickled (inside a command's options sent to workers): its settings, not its workers
        return {**self.__dict__, "actors": [], "running": False}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _EXECUTORS.add(self)

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, workers={self.workers}, cpus_per_worker={self.cpus_per_worker}, "
                f"gpus_per_worker={self.gpus_per_worker})")

    def pool_size(self, ray, n_items: int) -> int:
        if self.workers is not None:
            return max(1, min(self.workers, n_items))
        total = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            fit = int(total.get("GPU", 0) / self.gpus_per_worker + 1e-9)
            if fit < 1:
                raise ExecutorError(f"--gpus-per-worker {self.gpus_per_worker}: the Ray cluster has no GPU; "
                                    "leave it at 0 to run on CPUs.")
        else:
            fit = int(total.get("CPU", 1) / self.cpus_per_worker + 1e-9)
        return max(1, min(fit, n_items))

    def _start(self, ray, key: str, work_ref):
        actor = _actor_class(ray).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                          max_restarts=0).remote(max(1, int(self.cpus_per_worker)))
        actor.prepare.remote(key, [work_ref])  # runs before any item: an actor runs its calls in order
        return actor

    def map(self, work, items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Outcome]]:
        """(key, outcome) of each item, in the order they finish. The workers stay up for the next
        run (`close` stops them) unless this one is interrupted or fails."""
        if work.setup is None:
            raise ExecutorError("This work has no setup, so a Ray worker cannot build its state (the model); "
                                "give Work a setup (kvmem.executors.model_setup) or use executor='serial'.")
        ray = connect(self.address)
        from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

        died = (RayActorError, OutOfMemoryError, WorkerCrashedError, NodeDiedError)  # the worker, not the item

        queue = _Pending(items)
        self.restarts = 0
        # the setup's hash names the worker state: a worker given the same setup again keeps its model
        key = hashlib.sha256(ray.cloudpickle.dumps(work.setup)).hexdigest()
        work_ref = ray.put((work.setup, work.compute))
        size = self.pool_size(ray, len(queue))  # this run uses the first `size` workers; the others wait
        for actor in self.actors[:size]:
            actor.prepare.remote(key, [work_ref])
        if len(self.actors) < size:
            for other in list(_EXECUTORS):
                if other is not self and not other.running:
                    other.close()  # its idle workers would keep these from starting
            self.actors += [self._start(ray, key, work_ref) for _ in range(size - len(self.actors))]
        inflight: dict = {}  # object ref -> (worker slot, its actor, key, item, submission number)
        # id of a dead actor -> (the actor, the key of the item it was running when it died: the
        # only one to blame)
        running_when_died: dict = {}
        submitted = 0

        def submit(slot: int) -> None:
            nonlocal submitted
            while queue.may_submit([k for s, _, k, _, _ in inflight.values() if s == slot]):
                item_key, item = queue.popleft()
                submitted += 1
                inflight[self.actors[slot].run.remote(item)] = (slot, self.actors[slot], item_key, item, submitted)

        finished = False
        self.running = True
        try:
            for slot in range(size):
                submit(slot)
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                slot, actor, item_key, item, number = inflight.pop(ref)
                try:
                    status, value = ray.get(ref)
                except died as e:
                    if getattr(e, "actor_init_failed", False):  # could not even start: no retry helps
                        raise ExecutorError(
                            f"A Ray worker could not start ({_first_lines(e)}). Install the same kvmem (and the "
                            "code the work refers to) on every node of the cluster."
                        ) from None
                    # the worker died: a new one takes its items. Only the item it was running counts
                    # a try: an actor runs its calls in order, so that is the earliest submitted of its
                    # items not yet returned; the item queued behind it did nothing wrong.
                    if id(actor) not in running_when_died:  # (the actor kept in the value: its id stays its own)
                        mine = [(n, k) for _, a, k, _, n in inflight.values() if a is actor] + [(number, item_key)]
                        running_when_died[id(actor)] = (actor, min(mine)[1])
                    if running_when_died[id(actor)][1] == item_key:
                        queue.charge(item_key)
                    if queue.tries.get(item_key, 0) > self.max_retries:
                        raise ExecutorError(f"Item {item_key!r}: its worker died {queue.tries[item_key]} times (last: "
                                            f"{type(e).__name__}); stopped after {self.max_retries} retries. "
                                            "A worker running out of memory on this item is the usual cause.") from None
                    if self.actors[slot] is actor:
                        self.actors[slot] = self._start(ray, key, work_ref)
                        self.restarts += 1
                    queue.take_back(item_key, item, number)
                    submit(slot)
                    continue
                except RayTaskError as e:  # a bug in the computation, not a bad item: stop, as serially
                    raise e.as_instanceof_cause() from None
                if status == "setup-error":
                    raise ExecutorError(f"A Ray worker could not set up: {value}")
                submit(slot)
                yield item_key, (status, value)
            finished = True
        finally:
            self.running = False
            if not finished:  # interrupted or failed: stop the work still queued on the workers
                self.close()

    def close(self) -> None:
        """Stop the workers (the next run starts new ones)."""
        if self.actors:
            ray = import_ray()
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []

