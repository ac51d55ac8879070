"""Import a benchmark script (benchmarks/<name>.py) as a module, for the tests in this folder.

The scripts run as `python benchmarks/<name>.py`, with their own folder first on the import path
(their shared helpers are `benchmarks/common.py`, and some import another script); under pytest
that folder is put on the path here instead.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def script(name: str):
    """The module of benchmarks/<name>.py (imported once per test session)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == BENCHMARKS, f"{name} resolved to {module.__file__}"
    return module
