"""Lecture mode: a notebook rendered by Voila as an app, the panel live and the code hidden.

One Voila server for the module, on the quickstart (the shortest notebook with the panel).
The first test needs no browser: it reads the page over HTTP (the widgets' state lives in
the page's kernel and is not read here). The second drives the page in headless chromium.
"""

from __future__ import annotations

import os
import re
import shutil

import labdriver
import pytest

NOTEBOOK = labdriver.ROOT / "notebooks" / "00_quickstart.ipynb"
HARMLESS = (
    (r"ERR_NAME_NOT_RESOLVED", "Voila's page asks the internet for a resource; no network here"),
    (
        r"RUNTIME-012|remoteEntry|at async|at http|args: \{|module-federation",
        "Notebook 7's lab extension, which Voila loads and the app never uses, fails to federate",
    ),
)


@pytest.fixture(scope="module")
def voila(tmp_path_factory):
    reason = labdriver.voila_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"lecture mode cannot be tested under CI: {reason}", pytrace=False)
        pytest.skip(f"lecture-mode tests skipped: {reason}")
    workdir = tmp_path_factory.mktemp("voila")
    notebook = shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)
    with labdriver.voila_server(notebook, workdir) as server:
        server.page = server.fetch("/")  # returns once every cell has run
        yield server


def test_voila_renders_outputs_and_the_panel_without_the_code(voila):
    page = voila.page
    assert "validation accuracy after 20 epochs" in page  # printed outputs are there
    assert "nbtrain.Experiment(seed=0)" not in page  # the code is not
    views = re.findall(
        r'"application/vnd\.jupyter\.widget-view\+json": \{"model_id": "(\w+)"', page
    )
    assert views, "the page has no widget output"
    # The panel's output: its text form is nbtrain.Dashboard, its view a widget model.
    assert re.search(r'"model_id": "\w+"[^}]*\}, "text/plain": "nbtrain\.Dashboard"', page)


@pytest.mark.browser
def test_the_voila_app_shows_the_panel_and_start_trains(voila, context, artifacts):
    console = labdriver.Console(harmless=HARMLESS)
    page = context.new_page()
    console.attach(page)
    try:
        page.goto(voila.base + "/")
        panel = page.locator(labdriver.PANEL).first
        panel.locator(".nbtrain-main-figure").nth(3).wait_for(timeout=120_000)
        assert "nbtrain.Experiment(seed=0)" not in page.inner_text("body")  # no code shown
        assert "Loss" in " ".join(panel.locator(".nbtrain-main-figure").first.locator(
            "svg text").all_text_contents())  # fmt: skip

        def step() -> int:
            status = panel.locator(".widget-html").first.inner_text()
            found = re.search(r"step (\d+)", status)
            return int(found.group(1)) if found else -1

        before = step()
        panel.locator("button", has_text=re.compile(r"^\s*Start\s*$")).click()
        deadline = 60_000
        page.wait_for_function(
            "([selector, before]) => { const m = document.querySelector(selector)"
            "?.querySelector('.widget-html')?.innerText.match(/step (\\d+)/);"
            " return m && Number(m[1]) > before; }",
            arg=[labdriver.PANEL, before],
            timeout=deadline,
        )
        assert step() > before
        page.mouse.move(0, 0)
        page.screenshot(path=str(artifacts / "voila-quickstart.png"))
    finally:
        page.close()
    assert console.errors == [], "\n".join(console.errors)
