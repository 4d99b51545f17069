"""The Playground panel in JupyterLab: the boundary draws, moves while training, and a feature
switch clicked in the page rebuilds the experiment; the console stays free of errors."""

from __future__ import annotations

import re

import labdriver
import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "playground_flow.ipynb"
CELLS = [
    "import time\n"
    "import torch\n"
    "import nbtrain\n\n"
    "torch.set_num_threads(1)\n"
    "pg = nbtrain.Playground('spirals', noise=0.05, hidden=(16, 16), epochs=400)\n"
    "slow = lambda exp, _: time.sleep(0.01)  # slow enough to watch, a core left to the browser\n"
    "pg.experiment.on('step_completed', slow)\n"
    "pg.on_rebuild(lambda exp: exp.on('step_completed', slow))\n"
    "panel = nbtrain.PlaygroundPanel(pg)\n"
    "panel",
    "print('features:', pg.features, '| inputs:', pg.experiment.data.n_features)",
]


def drawn_step(lab) -> int | None:
    text = " ".join(lab.page.locator(".nbtrain-boundary svg text").all_text_contents())
    found = re.search(r"Decision boundary at step (\d+)", text)
    return int(found.group(1)) if found else None


def test_the_boundary_moves_while_training_and_a_feature_switch_rebuilds(
    server, context, artifacts
):
    labdriver.write_notebook(server.notebooks / NOTEBOOK, CELLS)
    page = context.new_page()
    console = labdriver.Console()
    console.attach(page)
    lab = labdriver.NotebookPage(page, server, NOTEBOOK).open()
    try:
        lab.run_cell(0)
        lab.wait_for_panel()
        boundary = page.locator(".nbtrain-boundary")
        boundary.wait_for(timeout=30_000)
        assert drawn_step(lab) == 0
        # Training and validation points are drawn over the heat map.
        assert boundary.locator("svg .dot").count() == 400

        lab.button("Start").click()
        lab.wait_for_status("running")
        first = lab.wait_until(lambda: (drawn_step(lab) or 0) > 0, 30, "the boundary moves")
        lab.wait_until(lambda: drawn_step(lab) > first, 30, "the boundary moves again")
        lab.screenshot(artifacts / "playground-01-training.png")

        page.locator(".nbtrain-playground button", has_text="x1*x2").click()
        lab.wait_until(lambda: drawn_step(lab) == 0, 30, "the new experiment's boundary")
        printed = lab.run_cell(1)
        assert "'x1', 'x2', 'x1*x2'" in printed and "inputs: 3" in printed, printed
        lab.screenshot(artifacts / "playground-02-feature.png")
        assert console.errors == [], console.errors
    finally:
        page.close()


CURVE_NOTEBOOK = "playground_curve.ipynb"
CURVE_CELLS = [
    "import time\n"
    "import torch\n"
    "import nbtrain\n\n"
    "torch.set_num_threads(1)\n"
    "reg = nbtrain.RegressionPlayground(n_samples=40, noise=0.3, hidden=(64, 64), epochs=2000)\n"
    "reg.experiment.on('step_completed', lambda exp, _: time.sleep(0.01))\n"
    "panel = nbtrain.PlaygroundPanel(reg)\n"
    "panel",
]


def curve_step(lab) -> int | None:
    text = " ".join(lab.page.locator(".nbtrain-curve svg text").all_text_contents())
    found = re.search(r"Fitted curve at step (\d+)", text)
    return int(found.group(1)) if found else None


def test_the_fitted_curve_moves_while_a_regression_trains(server, context, artifacts):
    labdriver.write_notebook(server.notebooks / CURVE_NOTEBOOK, CURVE_CELLS)
    page = context.new_page()
    console = labdriver.Console()
    console.attach(page)
    lab = labdriver.NotebookPage(page, server, CURVE_NOTEBOOK).open()
    try:
        lab.run_cell(0)
        lab.wait_for_panel()
        curve = page.locator(".nbtrain-curve")
        curve.wait_for(timeout=30_000)
        assert curve_step(lab) == 0
        assert curve.locator("svg .dot").count() == 40  # training and validation points
        line = curve.locator("svg path.line").first
        drawn = line.get_attribute("d")

        lab.button("Start").click()
        lab.wait_for_status("running")
        first = lab.wait_until(lambda: (curve_step(lab) or 0) > 0, 30, "the curve moves")
        lab.wait_until(lambda: curve_step(lab) > first, 30, "the curve moves again")
        assert line.get_attribute("d") != drawn
        lab.screenshot(artifacts / "playground-03-curve.png")
        assert console.errors == [], console.errors
    finally:
        page.close()
