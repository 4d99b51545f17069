# Set-up and the two jobs the README opens with. Everything lives in .venv; nothing global.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbtrain-installed
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test lint notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

# The main job: JupyterLab on the quickstart notebook.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/00_quickstart.ipynb

# The whole test suite: unit tests, the panel, and every notebook under strict nbval.
test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check nbtrain tests benchmarks scripts
	$(VENV)/bin/ruff format --check nbtrain tests benchmarks scripts

# Re-execute the notebooks and store their outputs (run after changing one).
notebooks: $(STAMP)
	$(PY) scripts/execute_notebooks.py notebooks/*.ipynb
