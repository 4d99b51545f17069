"""A smoke test of the panel in Notebook 7 (`jupyter notebook`), in headless chromium."""

from __future__ import annotations

import labdriver
import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "notebook7_smoke.ipynb"


# Notebook 7.6 at page load, in a notebook without nbtrain too: its shortcuts plugin reads
# the schema of a plugin whose settings are not loaded yet. Nothing on the page depends on it.
HARMLESS = ((r"Cannot read properties of undefined \(reading 'schema'\)", "Notebook 7 load race"),)


def test_the_panel_renders_in_notebook_7_and_start_grows_the_loss_line(
    notebook_server, context, artifacts
):
    labdriver.write_notebook(
        notebook_server.notebooks / NOTEBOOK, [labdriver.panel_cell(epochs=1000)]
    )
    console = labdriver.Console(harmless=HARMLESS)
    page = context.new_page()
    console.attach(page)
    try:
        notebook = labdriver.NotebookPage(page, notebook_server, NOTEBOOK, app="notebook").open()
        assert "/notebooks/" in page.url and not page.locator("#jp-main-dock-panel").count()
        notebook.run_cell(0)
        notebook.wait_for_panel()
        assert "Loss" in notebook.svg_text(0)

        notebook.button("Start").click()
        notebook.wait_for_status("running")
        first = notebook.wait_until(lambda: notebook.segments(0), 30, "the loss line is drawn")
        notebook.wait_until(
            lambda: notebook.segments(0) > first, 20, "the loss line grows in Notebook 7"
        )
        notebook.screenshot(artifacts / "notebook7-training.png")
        notebook.button("Stop").click()
        notebook.wait_for_status("stopped")
    finally:
        page.close()
    assert console.errors == [], "\n".join(console.errors)
