"""Check, in a real browser, that the panel's PNG and SVG buttons download the figures.

bqplot renders ``save_png``/``save_svg`` in the browser, so no kernel-side test can see the
files: this script starts JupyterLab on loopback, opens a notebook with a trained
`Dashboard` in headless Chromium (playwright), clicks PNG and SVG and checks each download
is a real PNG or SVG. It needs playwright and a Chromium (``/usr/bin/chromium`` by default).

    python scripts/check_figure_export.py [--chromium /usr/bin/chromium] [--keep DIR]

Exits 0 when every figure arrived as a file of its kind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("loss", "accuracy", "gradient-flow", "gradient-norms")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    code = (
        "import torch, nbtrain\n"
        "torch.set_num_threads(1)\n"
        "exp = nbtrain.Experiment(epochs=2)\n"
        "exp.run()\n"
        "exp.reset()\n"
        "exp.set(dropout=0.3)\n"
        "exp.run()\n"
        "dash = nbtrain.Dashboard(exp)\n"
        "dash.runs_panel.path.value = 'figs'\n"
        "dash.runs_panel.rows[exp.run_id - 1].overlay.value = True\n"
        "dash"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--keep", type=Path, help="copy the downloads here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="nbtrain-export-"))
    home = work / "home"
    settings = home / "share" / "jupyter" / "lab" / "settings"
    settings.mkdir(parents=True)
    (settings / "overrides.json").write_text(
        json.dumps(
            {
                "@jupyterlab/apputils-extension:notification": {
                    "fetchNews": "false",
                    "checkForUpdates": False,
                }
            }
        )
    )
    _notebook(work / "check.ipynb")
    port, token = _free_port(), "nbtrain-check"
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "JUPYTER_DATA_DIR": str(home / "share" / "jupyter"),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}",
            f"--LabApp.user_settings_dir={home / 'lab-user-settings'}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failures = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(work / "chromium"),
                executable_path=args.chromium,
                headless=True,
                accept_downloads=True,
                args=["--no-sandbox", "--disable-gpu"],
                viewport={"width": 1400, "height": 1800},
            )
            page = context.new_page()
            page.goto(f"{base}/lab/tree/check.ipynb?reset&token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            time.sleep(3)  # the kernel starts
            dialog = page.locator(".jp-Dialog .jp-mod-accept")
            if dialog.count():
                dialog.first.click()  # a kernel or trust question: take the default
            page.click("text=Run", timeout=30_000)
            page.click("text=Run All Cells", timeout=30_000)
            page.wait_for_selector(".nbtrain-dashboard", timeout=120_000)
            page.wait_for_selector(".nbtrain-dashboard .bqplot", timeout=60_000)
            time.sleep(2)
            page.screenshot(path=str(work / "panel.png"), full_page=True)
            downloads = []
            page.on("download", lambda download: downloads.append(download))
            for kind, magic in (("png", b"\x89PNG"), ("svg", b"<svg")):
                downloads.clear()
                page.locator(".nbtrain-dashboard button", has_text=kind.upper()).click()
                deadline = time.time() + 30
                while len(downloads) < len(FIGURES) and time.time() < deadline:
                    page.wait_for_timeout(200)
                got = {}
                for download in list(downloads):
                    target = work / download.suggested_filename
                    download.save_as(target)
                    got[download.suggested_filename] = target.read_bytes()
                expected = {f"figs-{name}.{kind}" for name in FIGURES}
                if set(got) != expected:
                    failures.append(
                        f"{kind}: downloads {sorted(got)}, expected {sorted(expected)}"
                    )
                for name, data in sorted(got.items()):
                    ok = data.startswith(magic) or (kind == "svg" and magic in data[:400])
                    print(f"{name}: {len(data)} bytes, {'ok' if ok else 'NOT ' + kind}")
                    if not ok:
                        failures.append(name)
            context.close()
    finally:
        server.terminate()
        server.wait(10)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        for f in work.glob("figs-*"):
            (args.keep / f.name).write_bytes(f.read_bytes())
        (args.keep / "panel.png").write_bytes((work / "panel.png").read_bytes())
    shutil.rmtree(work, ignore_errors=True)
    print("FAILED: " + "; ".join(failures) if failures else "every figure downloaded")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
