# The two commands of the README: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the releases this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
SOURCES := $(wildcard cli/*.py common/*.py common/tasks/*.py server/*.py client/*.py protos/fedlink/v1/*.py protos/fedlink/v1/*.proto)

.PHONY: demo test lint typecheck protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $@

# A strict editable install links the files that exist when it runs; relink when sources change.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

demo: $(VENV)/.installed
	$(BIN)/fedlink demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

protos: $(VENV)/.deps
	$(BIN)/python scripts/generate_protos.py

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/transport.py

clean:
	rm -rf $(VENV) build *.egg-info runs
