"""What a worker does: build its state once (`Work.setup`, e.g. load the model) and compute one
item at a time (`Work.compute(state, item)`), and how the model reaches a worker (`ModelSource`).

The weights reach Ray workers through a path every node has, not through the object store: a
worker calls `kvmem.load_model(name)`, which reads the factworld weights shipped inside the kvmem
package or a real model from kvmem's model cache (converted once per node from its GGUF package,
every file checked against the manifest's sha256 on load). The worker then compares the weights
fingerprint of what it loaded with the driver's (`kvmem.core.fingerprint.weights_fingerprint`): a
node holding other weights (another kvmem version, an edited model in the driver) stops the run
with `ExecutorError` instead of computing something else. A model object alone cannot be shipped:
TransformerLens 4's bridges do not pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kvmem.errors import ExecutorError

#: The attribute `kvmem.load_model` leaves on a model: how to load the same model again.
SOURCE_ATTR = "kvmem_source"


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads the driver's model: `kvmem.load_model(name, dtype=..., backend=...)` on
    the worker's own device, checked against `fingerprint` (the driver's weights fingerprint)."""

    name: str
    fingerprint: str
    dtype: str | None = None
    backend: str | None = None
    cache_dir: str | None = None

    def load(self, device: str | None = None):
        import torch

        import kvmem
        from kvmem.core.fingerprint import weights_fingerprint

        dtype = getattr(torch, self.dtype) if self.dtype else None
        model = kvmem.load_model(self.name, device=device, dtype=dtype, backend=self.backend, cache_dir=self.cache_dir)
        for p in model.parameters():
            p.requires_grad_(False)
        got = weights_fingerprint(model)
        if got != self.fingerprint:
            raise ExecutorError(
                f"A worker loaded {self.name!r} with other weights than the driver's (fingerprint {got[:12]} vs "
                f"{self.fingerprint[:12]}): the model was changed after loading, or this node has another kvmem or "
                "model cache. Run on an unedited model, and install the same kvmem on every node."
            )
        return model


def model_source(model) -> ModelSource:
    """The `ModelSource` of a model loaded by `kvmem.load_model` (which records its name)."""
    from kvmem.core.fingerprint import weights_fingerprint

    info = getattr(model, SOURCE_ATTR, None)
    if not isinstance(info, dict):
        raise ExecutorError(
            "This model was not loaded by kvmem.load_model, so Ray workers cannot load it themselves. Load it with "
            "kvmem.load_model(name or folder), or use executor='serial'."
        )
    return ModelSource(fingerprint=weights_fingerprint(model), **info)


def _worker_device() -> str:
    """A Ray worker's device: its GPU when Ray gave it one (CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_on_worker(source: ModelSource):
    """`Work.setup` for work that needs only the model."""
    return source.load(_worker_device())


def model_setup(model, executor, build: Callable | None = None, *extra) -> Callable[[], Any] | None:
    """`Work.setup` that loads `model` on a worker (`model_source`) and, with `build`, makes the
    worker's state `build(model, *extra)` (an editor, a statistics cache); None for the serial
    executor, which computes on `model` itself and must not need its name or hash its weights."""
    from functools import partial

    from kvmem.executors.serial import SerialExecutor

    if executor is None or executor == "serial" or isinstance(executor, SerialExecutor):
        return None
    load = partial(load_on_worker, model_source(model))
    return load if build is None else partial(_build_on, load, build, extra)


def _build_on(load: Callable, build: Callable, extra: tuple):
    return build(load(), *extra)


@dataclass(frozen=True)
class Work:
    """A batch run's work. `setup()` builds a worker's state once (a model, an editor; it must
    pickle, as it travels to Ray workers); `compute(state, item) -> dict` computes one item;
    `local` is the state the serial executor uses (the driver's own model, so a serial run loads
    nothing again)."""

    setup: Callable[[], Any] | None
    compute: Callable[..., Any]
    local: Any = field(default=None, repr=False)

    def local_state(self):
        if self.local is None and self.setup is None:
            raise ExecutorError("This work has neither a local state nor a setup.")
        return self.setup() if self.local is None else self.local
