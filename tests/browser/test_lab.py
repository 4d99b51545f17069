"""The panel in JupyterLab, driven by clicks in headless chromium and checked in the page.

The tests share one notebook and one run, in file order (start, switch, pause, stop, fail),
as a student would use it; each first brings the run to the state it needs, so one can also
run alone. Screenshots of every state land in artifacts/browser/.
"""

from __future__ import annotations

import re
import time

import labdriver
import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "lab_flow.ipynb"
PROBE = 1  # the cell that asks the kernel what the engine recorded
ARM_FAILURE = 2  # the cell that makes the next step fail, through an observer
CELLS = [
    labdriver.panel_cell(epochs=1000, seed=0),
    "print('state:', exp.state, '| step:', exp.step_count, '| changes:',\n"
    "      [(event.step, event.label) for event in exp.history.changes()])",
    "def explode(exp, _):\n"
    "    raise RuntimeError(f'observer failed on purpose at step {exp.step_count}')\n\n"
    "exp.on('step_completed', explode)",
]
LINE_FIGURES = {0: "loss", 1: "accuracy", 3: "gradient norm"}


@pytest.fixture(scope="module")
def lab(server, context):
    labdriver.write_notebook(server.notebooks / NOTEBOOK, CELLS)
    page = context.new_page()
    console = labdriver.Console()
    console.attach(page)
    notebook = labdriver.NotebookPage(page, server, NOTEBOOK).open()
    notebook.run_cell(0)
    notebook.wait_for_panel()
    notebook.console = console
    yield notebook
    page.close()


def segments(lab) -> dict[str, int]:
    return {name: lab.segments(index) for index, name in LINE_FIGURES.items()}


def paths(lab) -> dict[str, list[str]]:
    return {name: lab.line_paths(index) for index, name in LINE_FIGURES.items()}


def still(lab, seconds: float) -> dict[str, list[str]] | None:
    """The lines, if they did not change over `seconds`; None if they did."""
    first = paths(lab)
    time.sleep(seconds)
    return first if paths(lab) == first else None


def probe(lab) -> str:
    return lab.run_cell(PROBE)


def ensure_running(lab) -> None:
    state = lab.status().split(" ")[0]
    if state == "paused":
        lab.button("Resume").click()
    elif state != "running":
        lab.button("Start").click()
    lab.wait_for_status("running")
    # Two refreshes later the lines have points to grow from.
    lab.wait_until(lambda: lab.segments(0) > 0, 30, "the loss line has segments")


def test_the_figures_render_and_their_lines_grow_while_training(lab, artifacts):
    titles = [lab.svg_text(index) for index in range(4)]
    for index, title in enumerate(["Loss", "Accuracy", "Gradient flow", "gradient L2 norm"]):
        assert title in titles[index], f"figure {index} is not the {title} figure: {titles[index]}"
    assert lab.status().startswith("idle")
    lab.screenshot(artifacts / "lab-01-ready.png")

    lab.button("Start").click()
    lab.wait_for_status("running")
    lab.wait_until(lambda: lab.segments(0) > 0, 30, "the loss line has segments")
    before = segments(lab)
    # Every line gains segments within a few refreshes (accuracy: one point an epoch).
    seen = [before]

    def all_grew() -> bool:
        seen.append(segments(lab))
        return all(seen[-1][name] > before[name] for name in before)

    try:
        lab.wait_until(all_grew, 20, "every line grows")
    except AssertionError:
        pytest.fail(f"a line stopped growing while training runs: {before} → {seen[-1]}")
    heights = lab.bar_heights()
    assert len(heights) == 8 and all(h > 0 for h in heights), f"gradient bars: {heights}"
    lab.screenshot(artifacts / "lab-02-training.png")


def test_the_dropout_switch_marks_the_loss_plot_and_reaches_the_engine(lab, artifacts):
    ensure_running(lab)
    toggle = lab.button("Dropout")
    toggle.click()
    lab.wait_until(lambda: "dropout off→0.3" in lab.svg_text(0), 20, "the loss plot has a marker")
    assert "mod-active" in toggle.get_attribute("class")
    assert "dropout off→0.3" in lab.svg_text(1), "the accuracy plot has no marker"
    printed = probe(lab)
    step = re.search(r"\((\d+), 'dropout off→0.3'\)", printed)
    assert step and "state: running" in printed, printed
    assert int(step.group(1)) > 1, "the change should land mid-run, after the first step"
    lab.screenshot(artifacts / "lab-03-dropout-marker.png")


def test_pause_stops_the_lines_and_resume_restarts_them(lab, artifacts):
    ensure_running(lab)
    lab.button("Pause").click()
    lab.wait_for_status("paused")
    lab.button("Resume").wait_for()
    # The last refresh before the pause may still be on its way: the lines must come to
    # rest within a few seconds, then stay still.
    frozen = lab.wait_until(lambda: still(lab, 1.0), 10, "the lines stop growing when paused")
    frozen_status = lab.status()
    time.sleep(1.5)
    assert paths(lab) == frozen, "a line kept growing while paused"
    assert lab.status() == frozen_status
    assert "state: paused" in probe(lab)
    lab.screenshot(artifacts / "lab-04-paused.png")

    frozen_count = lab.segments(0)
    lab.button("Resume").click()
    lab.wait_for_status("running")
    lab.wait_until(lambda: lab.segments(0) > frozen_count, 20, "the loss line grows again")
    lab.screenshot(artifacts / "lab-05-resumed.png")


def test_stop_ends_the_run(lab, artifacts):
    ensure_running(lab)
    lab.button("Stop").click()
    lab.wait_for_status("stopped")
    assert lab.button("Stop").is_disabled() and lab.button("Start").is_enabled()
    assert "state: stopped" in probe(lab)
    ended = lab.wait_until(lambda: still(lab, 1.0), 10, "the lines stop growing after Stop")
    time.sleep(1.0)
    assert paths(lab) == ended, "a line grew after Stop"
    lab.screenshot(artifacts / "lab-06-stopped.png")


def test_a_failing_run_shows_its_message_in_the_panel(lab, artifacts):
    if lab.button("Stop").is_enabled():
        lab.button("Stop").click()
        lab.wait_for_status("stopped")
    assert lab.error_text() == ""
    lab.run_cell(ARM_FAILURE)
    lab.button("Start").click()
    lab.wait_for_status("failed")
    text = lab.wait_until(lab.error_text, 20, "the error area shows the failure")
    assert "The run failed" in text
    assert re.search(r"RuntimeError: observer failed on purpose at step \d+", text), text
    assert "state: failed" in probe(lab)
    lab.panel.locator(".widget-html", has_text="The run failed").scroll_into_view_if_needed()
    lab.screenshot(artifacts / "lab-07-failed.png")


def test_no_errors_in_the_browser_console(lab):
    assert lab.console.errors == [], "\n".join(lab.console.errors)
