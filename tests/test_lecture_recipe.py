"""Issue 7: a course's CI validates its own notebooks with the README's recipe.

The notebook is a lecturer's own (tests/fixtures/lecture_week3.ipynb), run from a folder
outside this checkout with the README's command exactly as written.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ROOT / "tests" / "fixtures" / "lecture_week3.ipynb"


def readme_command() -> str:
    section = (ROOT / "README.md").read_text().split("## Deterministic runs", 1)[1]
    section = section.split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    (line,) = [line for line in block.splitlines() if line.startswith("pytest ")]
    return line


def run(command: str, folder: Path) -> subprocess.CompletedProcess:
    """`command` in bash, with this venv's tools first on PATH and nbtrain from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        ["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_the_readme_recipe_passes_a_lecturers_notebook(tmp_path):
    shutil.copy(LECTURE, tmp_path / "lecture_week3.ipynb")
    command = readme_command().replace("my_lecture.ipynb", "lecture_week3.ipynb")
    result = run(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed\b", result.stdout)


@pytest.mark.slow
def test_the_sanitizer_masks_rates_durations_and_event_times(tmp_path):
    # Stored outputs no rerun can reproduce: only the sanitizer makes them compare equal.
    notebook = json.loads(LECTURE.read_text())
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream":
                continue
            text = "".join(output["text"])
            text = re.sub(r"[\d,.]+ steps/s", "987,654.3 steps/s", text)
            text = re.sub(r"took [\d.]+ s", "took 4321.000 s", text)
            text = re.sub(r"time=[\d.]+", "time=1000000000.5", text)
            output["text"] = text
    (tmp_path / "lecture_week3.ipynb").write_text(json.dumps(notebook))
    command = readme_command().replace("my_lecture.ipynb", "lecture_week3.ipynb")

    sanitized = run(command, tmp_path)
    assert sanitized.returncode == 0, sanitized.stdout[-3000:]
    unsanitized = run(re.sub(r'--nbval-sanitize-with "[^"]*"', "", command), tmp_path)
    assert unsanitized.returncode != 0
    assert re.search(r"\b2 failed, 3 passed\b", unsanitized.stdout), unsanitized.stdout[-3000:]
