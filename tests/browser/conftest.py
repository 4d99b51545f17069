"""One Jupyter server and one chromium for the whole browser suite (starting them is the
slow part), and the rule for a machine without chromium: skip, except under CI."""

from __future__ import annotations

import os
from pathlib import Path

import labdriver
import pytest

ARTIFACTS = labdriver.ROOT / "artifacts" / "browser"


@pytest.fixture(scope="session")
def browser_available() -> None:
    reason = labdriver.browser_missing()
    if reason is None:
        return
    # CI must run these tests: a missing browser there is a broken set-up, not a skip.
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason}")


@pytest.fixture(scope="session")
def server(browser_available, tmp_path_factory) -> labdriver.JupyterServer:
    """`jupyter lab`, for every JupyterLab test."""
    with labdriver.jupyter_server(tmp_path_factory.mktemp("jupyterlab")) as running:
        yield running


@pytest.fixture(scope="session")
def notebook_server(browser_available, tmp_path_factory) -> labdriver.JupyterServer:
    """`jupyter notebook` (Notebook 7), started only when a test asks for it."""
    folder = tmp_path_factory.mktemp("notebook7")
    with labdriver.jupyter_server(folder, app="notebook") as running:
        yield running


@pytest.fixture(scope="session")
def driver(browser_available):
    with labdriver.playwright() as running:
        yield running


@pytest.fixture(scope="session")
def context(driver, tmp_path_factory):
    """The JupyterLab tests' browser profile."""
    with labdriver.chromium(driver, tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots of each state, kept for a person to look at (gitignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
