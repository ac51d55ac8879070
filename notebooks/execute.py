"""Run the notebooks top to bottom and save them with their outputs, so that they read on a code
host with their figures and printed results.

    KVMEM_DATA=/path/to/data python notebooks/execute.py            # every notebook
    KVMEM_DATA=/path/to/data python notebooks/execute.py 04_rome    # those whose name contains "04_rome"

The kernel inherits the environment (set KVMEM_DATA so that notebook 04 uses the Wikipedia corpus,
as the committed outputs did). Outputs are kept except interactive HTML views larger than
`MAX_HTML_BYTES` (their inlined JavaScript runs to megabytes and a code host does not run it): those
keep their text form and a note saying to run the cell. tests/test_notebooks.py checks the size
limit and that every code cell was run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent

# Largest text/html output kept (bytes); larger ones (circuitsvis views, offline HTML reports) are
# left out of the saved notebook.
MAX_HTML_BYTES = 100_000
# The most a committed notebook may weigh (tests/test_notebooks.py).
MAX_NOTEBOOK_BYTES = 2_500_000

LEFT_OUT = "[interactive view left out of the saved notebook ({:,} bytes of HTML); run the cell to see it]"


def slim(book) -> int:
    """Drop text/html outputs over MAX_HTML_BYTES from `book` in place, and tqdm's warning that
    ipywidgets is missing (said when executed without the [notebooks] extra; it names a local
    path); returns how many large outputs were dropped."""
    dropped = 0
    for cell in book.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if not (o.get("name") == "stderr" and "IProgress not found" in
                                                            "".join(o.get("text", "")))]
        for out in cell.get("outputs", []):
            html = out.get("data", {}).get("text/html")
            if html is None:
                continue
            size = len(html if isinstance(html, str) else "".join(html))
            if size > MAX_HTML_BYTES:
                del out["data"]["text/html"]
                out["data"]["text/plain"] = LEFT_OUT.format(size)
                dropped += 1
    return dropped


def execute(path: Path, timeout: int = 3600) -> float:
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.perf_counter() - t0
    dropped = slim(book)
    nbformat.write(book, path)
    print(f"{path.name}: {seconds:.0f} s, {path.stat().st_size / 1e6:.2f} MB, {dropped} large HTML outputs left out",
          flush=True)
    return seconds


def main(argv: list[str]) -> None:
    """`[--slim] [NAME ...]`: execute the notebooks named (all by default); --slim only slims the
    saved ones (no execution)."""
    only_slim = "--slim" in argv
    argv = [a for a in argv if a != "--slim"]
    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    if argv:
        books = [b for b in books if any(a in b.stem for a in argv)]
    for path in books:
        if only_slim:
            import nbformat

            book = nbformat.read(path, as_version=4)
            slim(book)
            nbformat.write(book, path)
        else:
            execute(path)


if __name__ == "__main__":
    main(sys.argv[1:])
