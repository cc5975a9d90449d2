# The two commands a user runs on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/clip-data synth --out $(DEMO_DIR)/data
	$(BIN)/clip-train train --config configs/demo.yaml \
		data.train=$(DEMO_DIR)/data/train data.zeroshot=$(DEMO_DIR)/data/zeroshot \
		data.retrieval=$(DEMO_DIR)/data/retrieval run.output_dir=$(DEMO_DIR)/runs

test: install
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
