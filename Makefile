# Set-up and the two jobs the README opens with. Everything lives in .venv; nothing global.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbtrain-installed
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab lecture test test-browser screenshots lint notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

# The main job: JupyterLab on the quickstart notebook.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/00_quickstart.ipynb

# Lecture mode: a notebook as an app with Voila (outputs and the live panel, no code).
LECTURE ?= notebooks/04_training_challenges.ipynb
lecture: $(STAMP)
	$(VENV)/bin/voila $(LECTURE)

# The whole test suite: unit tests, the panel, every notebook under strict nbval, and the
# panel in JupyterLab and Notebook 7 in headless chromium (installed here when missing).
test: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest

# Only the browser tests; screenshots of each state land in artifacts/browser/.
test-browser: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -m browser tests/browser

# The README's pictures, from real runs in a real browser.
screenshots: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(PY) scripts/screenshots.py

lint: $(STAMP)
	$(VENV)/bin/ruff check nbtrain tests benchmarks scripts
	$(VENV)/bin/ruff format --check nbtrain tests benchmarks scripts

# Re-execute the notebooks and store their outputs (run after changing one).
notebooks: $(STAMP)
	$(PY) scripts/execute_notebooks.py notebooks/*.ipynb
