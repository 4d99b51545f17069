"""Execute notebooks in place with nbclient, storing outputs and widget state.

Usage: python scripts/execute_notebooks.py notebooks/00_quickstart.ipynb [...]
Run it after editing a notebook: nbval compares against the outputs stored here.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        notebook = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": path.parent}},
        ).execute()
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
