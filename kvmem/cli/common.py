"""What every command shares: messages, the output folder check, atomic writes (`kvmem.runs`),
progress bars and loading the model."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from kvmem.errors import InvalidArgumentError
from kvmem.runs import write_atomic


def say(args: argparse.Namespace, *parts: Any) -> None:
    """Print to stdout unless --quiet."""
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def warn(*parts: Any) -> None:
    print("kvmem:", *parts, file=sys.stderr, flush=True)


def no_display() -> None:
    import matplotlib

    matplotlib.use("Agg")  # batch jobs have no display


def check_out(out: str | Path) -> Path:
    """Fail before any work when the output folder cannot be written."""
    out = Path(out)
    probe = out / f".kvmem-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidArgumentError(
            f"Cannot write to the output folder {out} ({e.strerror or e}); choose a writable --out."
        ) from None
    return out


def write(path: Path, data: str | bytes) -> None:
    write_atomic(path, data)


def nan_to_null(obj: Any) -> Any:
    """`obj` with every float that is NaN or infinite replaced by None (JSON null: bare NaN is
    not JSON, and most parsers reject it); numpy / torch scalars become floats first."""
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    value = float(obj)  # numpy / torch scalars (what json.dumps(default=float) did)
    return value if math.isfinite(value) else None


def json_text(obj: Any) -> str:
    """Strict JSON of `obj` (a metric that cannot be computed is null), indented."""
    return json.dumps(nan_to_null(obj), indent=1, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write(path, json_text(obj))


def write_figure(path: Path, fig) -> None:
    from kvmem.viz.report import figure_png

    write(path, figure_png(fig))


def write_table(out: Path, stem: str, frame) -> list[str]:
    """CSV always; Parquet too when pyarrow is installed (it is not a kvmem dependency)."""
    written = [f"{stem}.csv"]
    write(out / f"{stem}.csv", frame.to_csv(index=False))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write(out / f"{stem}.parquet", buf.getvalue())
    return written + [f"{stem}.parquet"]


def strip_timing(record: dict) -> dict:
    """Results files hold what was computed, not how long it took: a resumed run writes the same."""
    return {k: v for k, v in record.items() if k not in ("seconds", "eval_s", "edit_s")}


def progress_bar(args: argparse.Namespace, total: int, initial: int, desc: str, unit: str = "fact"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=args.quiet, file=sys.stderr)


def load_model(name: str, quiet: bool = False, device: str | None = None):
    """The model of `--model` on `--device` (None: the loader's default)."""
    import kvmem

    if not quiet:
        return kvmem.load_model(name, device=device)
    # TransformerLens and transformers print loading chatter; --quiet means quiet (errors still raise).
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return kvmem.load_model(name, device=device)


def fingerprint(model) -> str:
    from kvmem.core.fingerprint import model_fingerprint

    return model_fingerprint(model)
