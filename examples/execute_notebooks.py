"""Execute the example notebooks in place, keeping their outputs.

    python examples/execute_notebooks.py                  # every notebook in examples/, full size
    python examples/execute_notebooks.py --small          # the size CI runs (ALORE_NOTEBOOK_SMALL=1)
    python examples/execute_notebooks.py examples/quickstart.ipynb

Each notebook runs in a fresh temporary folder, so what it writes (``runs/``, image
folders) never lands in the repository; the offline backbone and data are prepared
once in ``$ALORE_PEFT_CACHE`` (or ``~/.cache/alore_peft``) as usual. Outputs,
figures included, are written back into the notebook; execution timings are not
recorded, so re-running changes only what the code prints.

Cells whose output does not depend on the run's size, seed or machine (parameter
counts, adapted modules, saved files, merge checks) carry the cell tag
``deterministic``: ``tests/test_notebook.py`` re-runs every notebook at the small
size and fails when one of those outputs differs from the stored one.
The full-size run takes a few minutes per notebook on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DETERMINISTIC = "deterministic"  # the cell tag
SMALL_ENV = "ALORE_NOTEBOOK_SMALL"


def execute(path: str | os.PathLike, small: bool = False, timeout: int = 1800, workdir: str | None = None):
    """Run one notebook top to bottom and return it with its outputs (the file is not written).

    Args:
        path: The ``.ipynb`` file.
        small: Set ``ALORE_NOTEBOOK_SMALL=1`` for the kernel: the notebooks' small size.
        timeout: Seconds allowed per cell.
        workdir: The kernel's working folder; ``None``: a temporary folder, removed afterwards.

    Returns:
        The executed ``nbformat.NotebookNode``.

    Raises:
        nbclient.exceptions.CellExecutionError: A cell raised; its traceback is in the message.
    """
    import nbclient
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    env = dict(os.environ)
    if small:
        env[SMALL_ENV] = "1"
    else:
        env.pop(SMALL_ENV, None)
    with tempfile.TemporaryDirectory(prefix="alore-notebook-") as scratch:
        client = nbclient.NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": workdir or scratch}},
        )
        client.execute(env=env)
    return notebook


def deterministic_cells(notebook) -> list[tuple[int, str]]:
    """``(cell index, printed text)`` of every code cell tagged ``deterministic``.

    The text is what the cell wrote to stdout and the plain-text form of its
    results, in order; stderr (warnings, progress) is left out.
    """
    cells = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or DETERMINISTIC not in cell.get("metadata", {}).get("tags", []):
            continue
        parts = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                parts.append(output.get("text", ""))
            elif output.get("output_type") in ("execute_result", "display_data"):
                parts.append(output.get("data", {}).get("text/plain", ""))
        cells.append((index, "".join(parts)))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: every .ipynb in examples/)")
    parser.add_argument("--small", action="store_true", help=f"the small size CI runs ({SMALL_ENV}=1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default 1800)")
    args = parser.parse_args(argv)

    import nbformat

    paths = [Path(p) for p in args.notebooks] or sorted(EXAMPLES.glob("*.ipynb"))
    for path in paths:
        print(f"executing {path} ({'small' if args.small else 'full'} size)", flush=True)
        notebook = execute(path, small=args.small, timeout=args.timeout)
        if not deterministic_cells(notebook):
            print(f"note: {path} has no cell tagged {DETERMINISTIC!r}; CI compares nothing in it", file=sys.stderr)
        nbformat.write(notebook, str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
