# Everything a fresh machine needs: `make demo` runs the main job, `make test` the checks and tests.
# Both create .venv and install the CPU build of torch 2.13.0 (pinned: an open range pulls multi-GB CUDA).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint pytest bench clean

demo: $(STAMP)
	$(BIN)/shardflow demo

test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check shardflow tests benchmarks tools
	$(BIN)/ruff format --check shardflow tests benchmarks tools
	$(BIN)/mypy shardflow

# pytest exits 5 when it collects no test; say so instead of failing on it.
pytest: $(STAMP)
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/boxing.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/zero.py --ranks 2,4
	$(BIN)/python benchmarks/checkpoint.py
	$(BIN)/python benchmarks/async_save.py
	$(BIN)/python benchmarks/pipeline.py --ranks 2,4
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/overlap.py

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV)
