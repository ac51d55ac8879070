"""`get_executor`: "serial" (default), "ray", or an executor object, to an executor."""

from __future__ import annotations

from kvmem.errors import InvalidArgumentError

EXECUTORS = ("serial", "ray")
_DEFAULT_RAY = None


def get_executor(executor=None, **options):
    """An executor from a name ("serial", the default for None; "ray") and its `options` (for
    Ray: address, workers, gpus_per_worker, cpus_per_worker, max_retries), or `executor` itself
    when it already is one (something with a `map` method). "ray" without options is one executor
    shared by the whole process: its workers, and the models they loaded, serve the next call too."""
    if executor is None or executor == "serial":
        from kvmem.executors.serial import SerialExecutor

        return SerialExecutor()
    if executor == "ray":
        from kvmem.executors.ray_pool import RayExecutor

        if options:
            return RayExecutor(**options)
        global _DEFAULT_RAY
        if _DEFAULT_RAY is None:  # shared, so that calls in one session reuse its workers and their models
            _DEFAULT_RAY = RayExecutor()
        return _DEFAULT_RAY
    if hasattr(executor, "map"):
        return executor
    raise InvalidArgumentError(f"executor must be one of {EXECUTORS} or an executor object, got {executor!r}.")
