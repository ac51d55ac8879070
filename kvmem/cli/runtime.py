"""Options of every command that runs a model: `--threads`, `--device`, and the default output
folder, which names the model and the command so that runs of different models do not overwrite
each other (`kvmem-demo` for factworld, `kvmem-demo-gemma-3-270m` for Gemma)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from kvmem.errors import InvalidArgumentError


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """`--threads` and `--device`, for a command that loads a model."""
    from kvmem.cli.parser import positive_int

    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for PyTorch (torch.set_num_threads; default: PyTorch's own choice)")
    p.add_argument("--device", metavar="DEV",
                   help="where the model runs: cpu, cuda, cuda:1, mps (default: the model loader's choice, cpu)")


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """`--executor`, `--address`, `--workers`, `--gpus-per-worker`: where a batch command's items
    are computed (`kvmem.executors`; docs/scaling.md)."""
    from kvmem.cli.parser import positive_int

    g = p.add_argument_group("where the items run (docs/scaling.md)")
    g.add_argument("--executor", choices=("serial", "ray"), default="serial",
                   help="serial: one after another in this process (default); ray: on Ray workers ([ray] extra)")
    g.add_argument("--address", metavar="ADDR",
                   help="--executor ray: the cluster to join ('auto': the one this node belongs to, or "
                        "ray://HOST:10001); default: a local Ray started here with this machine's cores")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="--executor ray: workers, each loading the model once (default: as many as fit)")
    g.add_argument("--gpus-per-worker", type=_gpu_share, default=0.0, metavar="F",
                   help="--executor ray: GPU share per worker; 0.1 puts ten workers on one GPU (default: 0, CPU)")


def _gpu_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.1 or 1, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def executor(args: argparse.Namespace):
    """The executor of `add_executor_options`' flags: one per command (its Ray workers serve every
    step of the command: the statistics, then the facts)."""
    if getattr(args, "executor_", None) is None:
        args.executor_ = _make_executor(args)
    return args.executor_


def _make_executor(args: argparse.Namespace):
    from kvmem.executors import get_executor

    name = getattr(args, "executor", "serial")
    if name != "ray":
        if getattr(args, "address", None) or getattr(args, "workers", None) or getattr(args, "gpus_per_worker", 0):
            raise InvalidArgumentError("--address, --workers and --gpus-per-worker go with --executor ray.")
        return get_executor("serial")
    options = {"address": args.address, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker or None}
    return get_executor("ray", **{k: v for k, v in options.items() if v is not None})


def add_out_option(p: argparse.ArgumentParser, command: str) -> None:
    """`--out`, defaulting to `default_out(command, --model)` (resolved by `resolve`)."""
    p.add_argument("--out", metavar="FOLDER",
                   help=f"output folder (default: kvmem-{command} for factworld, kvmem-{command}-<model> otherwise)")
    p.set_defaults(out_command=command)


def default_out(command: str, model: str) -> str:
    """`kvmem-<command>` for the factworld model, else `kvmem-<command>-<model>` (a model folder by
    its name, other characters than letters, digits, '.', '_' and '-' replaced by '-')."""
    if str(model) == "factworld":
        return f"kvmem-{command}"
    name = Path(str(model)).expanduser().name or str(model)
    return f"kvmem-{command}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}"


def check_device(device: str | None) -> None:
    """Fail before any work when `--device` names no device of this machine."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {device}: this machine has no CUDA GPU; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                                       f"GPU(s), numbered from 0.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InvalidArgumentError(f"--device {device}: kvmem runs on cpu, cuda or mps.")


def resolve(args: argparse.Namespace) -> None:
    """Apply the runtime options before a command runs: the default `--out`, the device check and
    `--threads`."""
    if getattr(args, "out_command", None) and getattr(args, "out", None) is None:
        args.out = default_out(args.out_command, getattr(args, "model", "factworld"))
    check_device(getattr(args, "device", None))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
