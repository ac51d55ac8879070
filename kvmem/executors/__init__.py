"""Where a batch run's items are computed: in this process, one after another (`SerialExecutor`,
the default, exactly as kvmem always ran), or on Ray workers on this machine or a cluster
(`RayExecutor`, the `[ray]` extra).

    from kvmem.executors import Work, get_executor, run_items
    records = run_items(items, Work(setup, compute, local=model), log=run_log, executor="ray")

- `work`: `Work` (what a worker builds once and computes per item) and `ModelSource` (how a
  worker gets the driver's model: loaded by name from a path every node has, checked against the
  driver's weights fingerprint).
- `serial`, `ray_pool`: the two executors; `get_executor` turns "serial" / "ray" / an executor
  into one.
- `run`: `run_items`, which streams each finished item into the caller's `kvmem.runs.RunLog` as it
  arrives, so a run cut off anywhere resumes with nothing lost and nothing counted twice.

docs/scaling.md says how to run on a laptop, one GPU machine and a cluster.
"""

from kvmem.executors.run import ItemFailure, run_items
from kvmem.executors.serial import SerialExecutor
from kvmem.executors.work import ModelSource, Work, model_setup, model_source
from kvmem.executors.select import EXECUTORS, get_executor

__all__ = ["EXECUTORS", "ItemFailure", "ModelSource", "SerialExecutor", "Work", "get_executor", "model_setup", "model_source",
           "run_items"]
