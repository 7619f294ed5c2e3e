# Two entry points: `make serve` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
# CUDA users point this at a CUDA build, e.g. make TORCH_SPEC="torch==2.13.0 --index-url <CUDA wheel index>" serve
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Serves the embedded default on http://127.0.0.1:8000 (APTP_* environment variables change any setting,
# e.g. APTP_BUNDLE, APTP_PORT; see server/settings.py). Ctrl-C drains queued requests, then exits.
serve: $(STAMP)
	$(BIN)/aptp serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
