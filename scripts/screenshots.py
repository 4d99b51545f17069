"""The README's pictures of the panel, from real runs clicked through in a real browser.

Usage: python scripts/screenshots.py [--out docs/images]
(or `make screenshots`). Needs Debian's chromium at /usr/bin/chromium and the test extra
(playwright, JupyterLab). It starts JupyterLab on loopback with the browser tests' code
(tests/browser/labdriver.py), trains in the panel with clicks, and saves:

- training.png: a run going, dropout then batch norm switched on from the panel mid-run;
- sigmoid.png: the same network with sigmoid activations, whose gradient flow fades
  towards the input layer;
- failed.png: a run failed by a bug in a user's callback, the traceback in the panel.

The diagnosis view and the comparison of runs do not exist yet; they get pictures here
when they do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))

import labdriver  # noqa: E402  (lives with the browser tests, which use the same code)

# A callback with a typo, the sort of bug that fails a real run: the metric is "val_acc".
BUGGY_CALLBACK = """\
def report(exp, metrics):
    print(f"val accuracy {metrics['val_accuracy']:.3f}")

exp.on("evaluated", report)"""


def step_of(notebook: labdriver.NotebookPage) -> int:
    status = notebook.status()
    return int(status.split("step ")[1].split(" ")[0])


def wait_for_step(notebook: labdriver.NotebookPage, step: int, timeout: float = 120.0) -> None:
    notebook.wait_until(lambda: step_of(notebook) >= step, timeout, f"step {step}")


def open_panel(server, context, name: str, cells: list[str]) -> labdriver.NotebookPage:
    labdriver.write_notebook(server.notebooks / name, cells)
    page = context.new_page()
    console = labdriver.Console()
    console.attach(page)
    notebook = labdriver.NotebookPage(page, server, name).open()
    notebook.run_cell(0)
    notebook.wait_for_panel()
    notebook.console = console
    return notebook


def settle(notebook: labdriver.NotebookPage) -> None:
    """Let the last refresh land, so the picture matches the status line."""
    notebook.page.wait_for_timeout(600)


def training_and_failure(server, context, out: Path) -> list[Path]:
    # throttle: ~150 steps a second, so the markers fall at readable places.
    cells = [labdriver.panel_cell(throttle=0.005, epochs=60, seed=0), BUGGY_CALLBACK]
    notebook = open_panel(server, context, "training.ipynb", cells)
    notebook.button("Start").click()
    wait_for_step(notebook, 250)
    notebook.button("Dropout").click()
    wait_for_step(notebook, 550)
    notebook.button("Batch norm").click()
    wait_for_step(notebook, 900)
    settle(notebook)
    shots = [notebook.screenshot(out / "training.png", panel_only=True)]

    notebook.button("Stop").click()
    notebook.wait_for_status("stopped")
    notebook.run_cell(1)
    notebook.button("Start").click()
    notebook.wait_for_status("failed")
    notebook.wait_until(notebook.error_text, 20, "the error area shows the failure")
    settle(notebook)
    shots.append(notebook.screenshot(out / "failed.png", panel_only=True))
    check_console(notebook)
    notebook.page.close()
    return shots


def sigmoid(server, context, out: Path) -> list[Path]:
    cell = labdriver.panel_cell(throttle=0.005, epochs=60, seed=0, activation="sigmoid")
    notebook = open_panel(server, context, "sigmoid.ipynb", [cell])
    notebook.button("Start").click()
    wait_for_step(notebook, 600)
    notebook.button("Pause").click()
    notebook.wait_for_status("paused")
    settle(notebook)
    shot = notebook.screenshot(out / "sigmoid.png", panel_only=True)
    notebook.button("Stop").click()
    check_console(notebook)
    notebook.page.close()
    return [shot]


def check_console(notebook: labdriver.NotebookPage) -> None:
    if notebook.console.errors:
        raise SystemExit("browser console errors:\n" + "\n".join(notebook.console.errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    missing = labdriver.browser_missing()
    if missing:
        raise SystemExit(f"cannot take screenshots: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbtrain-screenshots-") as work:
        work = Path(work)
        with labdriver.jupyter_server(work) as server, labdriver.playwright() as driver:
            with labdriver.chromium(driver, work / "profile", width=1200, height=1500) as context:
                shots = training_and_failure(server, context, args.out)
                shots += sigmoid(server, context, args.out)
    for shot in shots:
        print(f"{shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}")
    print(f"{len(shots)} screenshots in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
