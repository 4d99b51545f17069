"""Drive a real Jupyter server and headless chromium: shared by the browser tests and
`scripts/screenshots.py`, so the pictures in the README come from the code the tests check.

The server runs on loopback with its own home, config, data and runtime directories and a
token, so it neither reads nor writes the user's Jupyter set-up. Chromium is Debian's
(`/usr/bin/chromium`), driven by playwright's Python package; playwright's own browser
download does not work on the machines this project is built on.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

# Without the networking flags chromium keeps dialling out, and this machine's closed
# network refuses every attempt; --no-sandbox because the tests run as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The news and update-check toast covers the page a few seconds after load.
SETTINGS_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}
}

PANEL = ".nbtrain-dashboard"


def browser_missing() -> str | None:
    """Why the browser cannot be driven here, or None when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian's chromium package: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install -e '.[test]')"
    return None


def panel_cell(throttle: float = 0.01, **config: Any) -> str:
    """The cell a user runs: an Experiment and its Dashboard (the panel is its output).

    `throttle` seconds of sleep after each step, through an observer, keep a run slow enough
    to watch: below the panel's 2,000 points a line for the length of a test, so every
    refresh adds segments, and with a core left for the browser on a 2-core machine.
    """
    arguments = ", ".join(f"{name}={value!r}" for name, value in config.items())
    return (
        "import time\n"
        "import torch\n"
        "import nbtrain\n\n"
        "torch.set_num_threads(1)\n"
        f"exp = nbtrain.Experiment({arguments})\n"
        f"exp.on('step_completed', lambda exp, _: time.sleep({throttle!r}))\n"
        "dash = nbtrain.Dashboard(exp)\n"
        "dash"
    )


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells; markdown is left out, the tests address cells by index."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class JupyterServer:
    """A running Jupyter server whose root is `notebooks`."""

    process: subprocess.Popen
    port: int
    token: str
    notebooks: Path
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str, app: str = "lab") -> str:
        """The address of a notebook in JupyterLab (`app="lab"`) or Notebook 7 (`"notebook"`)."""
        path = {"lab": "lab/tree", "notebook": "notebooks"}[app]
        # ?reset: an old workspace does not reopen other tabs; the token logs the page in.
        return f"{self.base}/{path}/{notebook}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET", prefix: str = "api") -> Any:
        request = urllib.request.Request(
            f"{self.base}/{prefix}/{path}",
            headers={"Authorization": f"token {self.token}"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _environment(home: Path, jupyter: Path) -> dict[str, str]:
    """A server's environment: its own home and Jupyter folders, and the kernel importing
    nbtrain from this checkout, whatever the venv points at."""
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(jupyter / "config"),
        JUPYTER_DATA_DIR=str(jupyter / "data"),
        JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
        IPYTHONDIR=str(home / ".ipython"),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


@contextmanager
def _serving(
    process: subprocess.Popen,
    server: Any,
    ready: Callable[[], object],
    errors: tuple[type[BaseException], ...],
    timeout: float,
) -> Iterator[Any]:
    """Wait until `ready()` no longer raises one of `errors`, yield `server`, then end the
    process (terminate, and kill it if it lingers)."""
    name = Path(process.args[2]).name if isinstance(process.args, list) else "server"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.tail()}")
            try:
                ready()
                break
            except errors as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name} not ready in {timeout:.0f} s:\n{server.tail()}"
                    ) from exc
                time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextmanager
def jupyter_server(
    workdir: Path, app: str = "lab", timeout: float = 90.0
) -> Iterator[JupyterServer]:
    """Start `jupyter lab` (or `jupyter notebook`, Notebook 7) with everything in `workdir`.

    `workdir` gets home, jupyter and notebooks folders. Note: one server per front end:
    after a JupyterLab page, Notebook 7 pages on the same server fail on a command they
    do not have ('filebrowser:open-path'), with the workspaces deleted and a fresh browser
    profile too; a person runs one or the other.
    """
    home, jupyter, notebooks = workdir / "home", workdir / "jupyter", workdir / "notebooks"
    settings = jupyter / "data" / "share" / "jupyter" / "lab" / "settings"
    for folder in (home, notebooks, settings, jupyter / "config", jupyter / "runtime"):
        folder.mkdir(parents=True, exist_ok=True)
    (settings / "overrides.json").write_text(json.dumps(SETTINGS_OVERRIDES))
    # Both front-ends read their settings overrides from app_settings_dir only.
    app_settings = {"app_settings_dir": str(settings)}
    config = {"LabApp": app_settings, "JupyterNotebookApp": app_settings}
    (jupyter / "config" / "jupyter_server_config.json").write_text(json.dumps(config))

    env = _environment(home, jupyter)
    port, token = _free_port(), secrets.token_hex(16)
    log = workdir / "jupyter.log"
    command = [
        sys.executable, "-m", {"lab": "jupyterlab", "notebook": "notebook"}[app],
        "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={notebooks}", "--ServerApp.terminals_enabled=False",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = JupyterServer(process, port, token, notebooks, log)
    errors = (urllib.error.URLError, ConnectionError, TimeoutError)
    with _serving(process, server, lambda: server.api("status"), errors, timeout) as ready:
        yield ready


@contextmanager
def playwright() -> Iterator[Any]:
    """Playwright's driver; one per thread, shared by every browser profile opened in it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@contextmanager
def chromium(
    driver: Any, user_data_dir: Path, width: int = 1400, height: int = 1100
) -> Iterator[Any]:
    """A BrowserContext over Debian's headless chromium with a fresh profile in `user_data_dir`."""
    user_data_dir.mkdir(parents=True, exist_ok=True)
    # Note: chromium takes its profile from launch_persistent_context, not as a flag.
    context = driver.chromium.launch_persistent_context(
        str(user_data_dir),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport={"width": width, "height": height},
    )
    try:
        yield context
    finally:
        context.close()


@dataclass
class Console:
    """The page's console errors and uncaught exceptions, with the noise we accept."""

    errors: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    # (pattern, why it is harmless); only add a pattern with its reason.
    harmless: tuple[tuple[str, str], ...] = ()

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: m.type == "error" and self._add(f"console: {m.text}"))
        page.on("pageerror", lambda exc: self._add(f"uncaught: {exc}"))
        # The console's "Failed to load resource" does not say which; this does.
        page.on(
            "response",
            lambda r: (
                r.status >= 400 and self._add(f"http {r.status}: {r.request.method} {r.url}")
            ),
        )

    def _add(self, text: str) -> None:
        for pattern, _why in self.harmless:
            if re.search(pattern, text):
                self.ignored.append(text)
                return
        self.errors.append(text)


class NotebookPage:
    """One notebook open in JupyterLab or Notebook 7, and the nbtrain panel in its output."""

    def __init__(self, page: Any, server: JupyterServer, name: str, app: str = "lab"):
        self.page, self.server, self.name, self.app = page, server, name, app

    def open(self, timeout: float = 60.0) -> NotebookPage:
        self.page.goto(self.server.url(self.name, self.app))
        self.page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=timeout * 1000)
        self.wait_for_kernel(timeout)
        return self

    def wait_for_kernel(self, timeout: float = 60.0) -> None:
        """Wait on the REST API: the toolbar says idle before the kernel even exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                sessions = self.server.api("sessions")
            except urllib.error.HTTPError:  # Note: HTTP 500 for a moment as a kernel starts
                sessions = []
            mine = [s for s in sessions if s["path"].endswith(self.name)]
            if mine and mine[0]["kernel"]["execution_state"] == "idle":
                return
            time.sleep(0.25)
        raise TimeoutError(f"no idle kernel for {self.name} in {timeout:.0f} s")

    # Cells

    def cell(self, index: int) -> Any:
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index)

    def run_cell(self, index: int, timeout: float = 60.0) -> str:
        """Run one cell as a person does (click into it, Ctrl+Enter); return its output text."""
        cell = self.cell(index)
        cell.locator(".jp-InputArea-editor").click()
        before = cell.locator(".jp-InputPrompt").inner_text()
        self.page.keyboard.press("Control+Enter")
        # The prompt shows [*] while running, then a new execution count.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            prompt = cell.locator(".jp-InputPrompt").inner_text()
            if prompt != before and "*" not in prompt and re.search(r"\d", prompt):
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"cell {index} did not finish in {timeout:.0f} s")
        return self.output(index)

    def output(self, index: int) -> str:
        return self.cell(index).locator(".jp-OutputArea").inner_text()

    # The panel

    @property
    def panel(self) -> Any:
        return self.page.locator(PANEL).first

    def wait_for_panel(self, timeout: float = 60.0) -> None:
        self.panel.locator(".nbtrain-main-figure").nth(3).wait_for(timeout=timeout * 1000)

    def button(self, label: str) -> Any:
        return self.panel.locator("button", has_text=re.compile(f"^\\s*{label}\\s*$"))

    def toggle(self, label: str) -> Any:
        """A switch (ToggleButton): unlike `button`, never a remedy button of the same name."""
        return self.panel.locator(
            "button.widget-toggle-button", has_text=re.compile(f"^\\s*{label}\\s*$")
        )

    def visible_button(self, label: str) -> Any:
        """A shown button whose text starts with `label` (remedy cards are hidden until a
        finding stands)."""
        return self.panel.locator(
            "button:visible", has_text=re.compile(f"^\\s*{re.escape(label)}")
        )

    def open_tab(self, title: str) -> None:
        self.panel.locator(".lm-TabBar-tab", has_text=title).first.click()

    def status(self) -> str:
        return self.panel.locator(".widget-html").first.inner_text()

    def wait_for_status(self, word: str, timeout: float = 30.0) -> str:
        return self.wait_until(lambda: word in self.status(), timeout, f"status says {word!r}")

    def figure(self, index: int) -> Any:
        """0 loss, 1 accuracy, 2 gradient-flow bars, 3 per-layer gradient norms."""
        return self.panel.locator(".nbtrain-main-figure").nth(index)

    def line_paths(self, index: int) -> list[str]:
        """The `d` of every drawn line in one figure (markers' dashed lines included)."""
        return (
            self.figure(index)
            .locator("svg path.line")
            .evaluate_all("paths => paths.map(p => p.getAttribute('d') || '')")
        )

    def segments(self, index: int) -> int:
        """Line segments drawn in one figure: grows by one a point on each line."""
        return sum(len(re.findall(r"L", d)) for d in self.line_paths(index))

    def svg_text(self, index: int) -> str:
        """Every SVG text in one figure: title, ticks, legend and marker labels."""
        return " ".join(self.figure(index).locator("svg text").all_text_contents())

    def bar_heights(self) -> list[float]:
        return (
            self.figure(2)
            .locator("svg rect.bar")
            .evaluate_all("bars => bars.map(b => parseFloat(b.getAttribute('height')) || 0)")
        )

    def error_text(self) -> str:
        """The panel's error area; empty while it is hidden."""
        areas = self.panel.locator(".widget-html", has_text="The run failed")
        return areas.first.inner_text() if areas.count() else ""

    def wait_until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
            time.sleep(0.1)

    def screenshot_parts(self, path: Path, first: int, last: int) -> Path:
        """Only the panel's rows `first` to `last` (its children, in order), as one picture.

        Rows hidden now (an error area with nothing to say) take no room. The panel is
        scrolled to the top of the notebook first: JupyterLab draws only what is in view.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.mouse.move(0, 0)  # a hovered figure shows bqplot's toolbar over the plot
        self.panel.evaluate("el => el.scrollIntoView({block: 'start'})")
        rows = self.panel.locator(":scope > *")
        boxes = [rows.nth(i).bounding_box() for i in range(first, last + 1)]
        boxes = [box for box in boxes if box and box["height"] > 0]
        panel = self.panel.bounding_box()
        top = min(box["y"] for box in boxes)
        bottom = max(box["y"] + box["height"] for box in boxes)
        margin = 4
        clip = {
            "x": panel["x"] - margin,
            "y": top - margin,
            "width": panel["width"] + 2 * margin,
            "height": bottom - top + 2 * margin,
        }
        self.page.screenshot(path=str(path), clip=clip)
        return path

    def screenshot(self, path: Path, panel_only: bool = False) -> Path:
        """The page (or only the panel, which must fit in the viewport to be whole)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.mouse.move(0, 0)  # a hovered figure shows bqplot's toolbar over the plot
        if panel_only:
            self.panel.scroll_into_view_if_needed()
            self.panel.screenshot(path=str(path))
        else:
            self.page.screenshot(path=str(path))
        return path


# Lecture mode: a notebook served by Voila as an app (outputs and widgets, no code)


@dataclass
class VoilaServer:
    """Voila serving one notebook at `/` on loopback (no token: loopback only)."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def fetch(self, path: str = "/", timeout: float = 300.0) -> str:
        """The page at `path`; for `/` Voila answers once every cell has run."""
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return response.read().decode()


def voila_missing() -> str | None:
    """Why Voila cannot run here, or None when it can."""
    try:
        import voila  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is missing (pip install -e '.[lecture]')"
    return None


@contextmanager
def voila_server(notebook: Path, workdir: Path, timeout: float = 60.0) -> Iterator[VoilaServer]:
    """Start `voila notebook` on a free loopback port, with its own home and Jupyter folders
    in `workdir`, and the kernel importing nbtrain from this checkout."""
    home, jupyter = workdir / "home", workdir / "jupyter"
    for folder in (home, jupyter / "config", jupyter / "data", jupyter / "runtime"):
        folder.mkdir(parents=True, exist_ok=True)
    env = _environment(home, jupyter)
    port = _free_port()
    log = workdir / "voila.log"
    command = [
        sys.executable, "-m", "voila", str(notebook), "--no-browser",
        f"--port={port}", "--Voila.ip=127.0.0.1",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = VoilaServer(process, port, log)

    def listening() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    with _serving(process, server, listening, (OSError,), timeout) as ready:
        yield ready
