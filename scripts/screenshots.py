"""The README's pictures of the panel, from real runs clicked through in a real browser.

Usage: python scripts/screenshots.py [--out docs/images] [--only NAME ...]
(or `make screenshots`). Needs Debian's chromium at /usr/bin/chromium and the test extra
(playwright, JupyterLab). It starts JupyterLab on loopback with the browser tests' code
(tests/browser/labdriver.py), trains in the panel with clicks, and saves:

- training.png: the whole panel, a run going, dropout then batch norm switched on mid-run;
- sigmoid.png: the same network with sigmoid activations, whose gradient flow fades
  towards the input layer (the figures only);
- failed.png: a run failed by a bug in a user's callback, the traceback in the panel;
- diagnosis.png: the `vanishing` preset, its finding card with evidence and remedies;
- remedy.png: the same run after a click on the card's "ReLU activations": the finding
  has cleared and the loss falls;
- runs.png: the `overfitting` preset forked mid-run with dropout 0.5 set in the fork form,
  both runs named in the table and overlaid on the plots;
- init.png: the Init inspector tab, He against PyTorch's default on 8 ReLU layers.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))

import labdriver  # noqa: E402  (lives with the browser tests, which use the same code)

# The panel's rows, in the order Dashboard lays them out.
BUTTONS, STATUS, SWITCHES, DIAGNOSIS, TABS, ERROR, PLOTS, RUNS = 0, 1, 3, 4, 5, 6, 7, 8

# A callback with a typo, the sort of bug that fails a real run: the metric is "val_acc".
BUGGY_CALLBACK = """\
def report(exp, metrics):
    print(f"val accuracy {metrics['val_accuracy']:.3f}")

exp.on("evaluated", report)"""


def step_of(notebook: labdriver.NotebookPage) -> int:
    return int(re.search(r"step (\d+)", notebook.status()).group(1))


def val_acc(notebook: labdriver.NotebookPage) -> float:
    found = re.search(r"val acc ([\d.]+)", notebook.status())
    return float(found.group(1)) if found else 0.0


def wait_for_step(notebook: labdriver.NotebookPage, step: int, timeout: float = 120.0) -> None:
    notebook.wait_until(lambda: step_of(notebook) >= step, timeout, f"step {step}")


def open_panel(server, context, name: str, cells: list[str]) -> labdriver.NotebookPage:
    labdriver.write_notebook(server.notebooks / name, cells)
    page = context.new_page()
    console = labdriver.Console()
    console.attach(page)
    notebook = labdriver.NotebookPage(page, server, name).open()
    # More room for the panel: fold the file browser away, as one does for a lecture.
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
    notebook.run_cell(0)
    notebook.wait_for_panel()
    notebook.console = console
    return notebook


def settle(notebook: labdriver.NotebookPage) -> None:
    """Let the last refresh land, so the picture matches the status line."""
    notebook.page.wait_for_timeout(800)


def close(notebook: labdriver.NotebookPage) -> None:
    if notebook.button("Stop").is_enabled():
        notebook.button("Stop").click()
    check_console(notebook)
    notebook.page.close()


def training_and_failure(server, context, out: Path) -> list[Path]:
    # throttle: ~150 steps a second, so the markers fall at readable places.
    cells = [labdriver.panel_cell(throttle=0.005, epochs=60, seed=0), BUGGY_CALLBACK]
    notebook = open_panel(server, context, "training.ipynb", cells)
    notebook.button("Start").click()
    wait_for_step(notebook, 250)
    notebook.toggle("Dropout").click()
    wait_for_step(notebook, 550)
    notebook.toggle("Batch norm").click()
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
    shots.append(notebook.screenshot_parts(out / "failed.png", BUTTONS, ERROR))
    close(notebook)
    return shots


def sigmoid(server, context, out: Path) -> list[Path]:
    cell = labdriver.panel_cell(throttle=0.005, epochs=60, seed=0, activation="sigmoid")
    notebook = open_panel(server, context, "sigmoid.ipynb", [cell])
    notebook.button("Start").click()
    wait_for_step(notebook, 600)
    notebook.button("Pause").click()
    notebook.wait_for_status("paused")
    settle(notebook)
    shot = notebook.screenshot_parts(out / "sigmoid.png", PLOTS, PLOTS)
    close(notebook)
    return [shot]


def diagnosis(server, context, out: Path) -> list[Path]:
    cell = labdriver.panel_cell(throttle=0.01, preset="vanishing", seed=0, epochs=40)
    notebook = open_panel(server, context, "vanishing.ipynb", [cell])
    card = notebook.panel.locator(".widget-html", has_text="Vanishing gradients")
    notebook.button("Start").click()
    card.wait_for(state="visible", timeout=60_000)
    wait_for_step(notebook, 200)  # long enough for the stall to show on the plots
    settle(notebook)
    shots = [notebook.screenshot_parts(out / "diagnosis.png", BUTTONS, PLOTS)]

    notebook.visible_button("ReLU activations").click()
    card.wait_for(state="hidden", timeout=60_000)
    calm = notebook.panel.locator(".widget-html", has_text="No training challenge detected")
    calm.wait_for(state="visible", timeout=60_000)
    notebook.wait_until(lambda: val_acc(notebook) > 0.9, 90, "validation accuracy above 0.9")
    notebook.button("Pause").click()
    notebook.wait_for_status("paused")
    settle(notebook)
    shots.append(notebook.screenshot_parts(out / "remedy.png", BUTTONS, PLOTS))
    close(notebook)
    return shots


def runs(server, context, out: Path) -> list[Path]:
    cell = labdriver.panel_cell(throttle=0.01, preset="overfitting", seed=0)
    notebook = open_panel(server, context, "runs.ipynb", [cell])
    table = notebook.panel.locator(".widget-gridbox", has_text="vs baseline")
    names = table.locator("input[type=text]")
    rename(names.nth(0), "no regularization")
    notebook.button("Start").click()
    # The fork starts with dropout 0.5: the form's slider, moved with the keyboard (0.05 a key)
    fork = notebook.page.locator("button", has_text="Fork here")
    form = notebook.panel.locator(".widget-hbox", has=fork).last
    form.locator(".noUi-handle").first.click()
    for _ in range(10):
        notebook.page.keyboard.press("ArrowRight")
    readout = form.locator(".widget-readout").first
    notebook.wait_until(lambda: readout.inner_text().strip() == "0.50", 10, "the form says 0.50")
    wait_for_step(notebook, 100)
    notebook.button("Fork here").click()
    notebook.wait_until(lambda: names.count() == 2, 20, "the fork has a row")
    rename(names.nth(1), "dropout 0.5 (fork)")
    notebook.wait_until(
        lambda: notebook.panel.locator(".widget-html", has_text="finished").count() >= 3,
        300,  # two runs on two busy cores: the lone scene took under a minute
        "both runs finished",
    )  # the status line and both rows of the table
    settle(notebook)
    shot = notebook.screenshot_parts(out / "runs.png", PLOTS, RUNS)
    close(notebook)
    return [shot]


def rename(box, name: str) -> None:
    box.fill(name)
    box.press("Enter")


def init_inspector(server, context, out: Path) -> list[Path]:
    cell = labdriver.panel_cell(hidden=(64,) * 8, activation="relu", init="he", seed=0)
    notebook = open_panel(server, context, "init.ipynb", [cell])
    notebook.open_tab("Init inspector")
    notebook.button("Compare").click()
    table = notebook.panel.locator("table", has_text="weight std")
    table.wait_for(timeout=30_000)
    settle(notebook)
    shot = notebook.screenshot_parts(out / "init.png", TABS, TABS)
    close(notebook)
    return [shot]


def check_console(notebook: labdriver.NotebookPage) -> None:
    if notebook.console.errors:
        raise SystemExit("browser console errors:\n" + "\n".join(notebook.console.errors))


SCENES: dict[str, Callable] = {
    "training": training_and_failure,
    "sigmoid": sigmoid,
    "diagnosis": diagnosis,
    "runs": runs,
    "init": init_inspector,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument(
        "--only", nargs="+", choices=list(SCENES), help="these scenes only (default: all)"
    )
    args = parser.parse_args()
    missing = labdriver.browser_missing()
    if missing:
        raise SystemExit(f"cannot take screenshots: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    shots: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="nbtrain-screenshots-") as work:
        work = Path(work)
        with labdriver.jupyter_server(work) as server, labdriver.playwright() as driver:
            # Tall enough that the whole panel, run table included, is in view at once.
            with labdriver.chromium(driver, work / "profile", width=1280, height=2000) as context:
                for name in args.only or SCENES:
                    shots += SCENES[name](server, context, args.out)
    for shot in shots:
        print(f"{shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot}")
    print(f"{len(shots)} screenshots in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
