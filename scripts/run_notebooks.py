"""Execute the notebooks in place on this checkout's real data and runs (``make notebooks``).

``python scripts/run_notebooks.py [NAME ...]`` (default: every ``notebooks/*.ipynb``). Each runs
top to bottom in a fresh ``python3`` kernel from ``notebooks/``, reading the configured data set
and MLflow store, and is saved with its outputs, so the committed notebooks show real results.
``FASHION_SERVE_NOTEBOOK_OVERRIDES`` passes ``section.key=value`` settings, as in the notebooks.
A failing cell stops with one ``error:`` line naming the notebook; nothing is overwritten then.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 1800
# nbformat has no type hints.
_read: Callable[..., Any] = nbformat.read
_write: Callable[..., Any] = nbformat.write


def run(path: Path) -> None:
    """Execute ``path`` and write it back with its outputs (only when every cell ran)."""
    notebook = _read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    _write(notebook, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            print(f"error: no notebook {path}", file=sys.stderr)
            return 2
        started = time.perf_counter()
        try:
            run(path)
        except CellExecutionError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            print(f"error: {path.name}: a cell failed: {first}", file=sys.stderr)
            return 2
        print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
