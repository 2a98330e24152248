# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Exact builds that pip finds on this machine's disk (other versions download gigabytes).
TORCH  := torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/digits.yaml

export WANDB_SILENT ?= true

.PHONY: train test test-slow bench browser install install-dev install-bench clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

## Train the default configuration on the embedded decoy-digits dataset; prints a summary.
train: $(VENV)/.installed
	$(VENV)/bin/harmonia fit --config $(CONFIG)

## The test suite (< 10 minutes on 2 cores); long tests are marked `slow`.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow" -q

## Long tests only (DDP, resume after SIGKILL, ...).
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -m slow -q || [ $$? -eq 5 ]  # exit 5: no test is marked slow yet

## Benchmarks: tables on stdout, JSON under benchmarks/results/.
bench: $(VENV)/.installed-bench
	$(PY) benchmarks/step_cost.py --out benchmarks/results/step_cost.json
	$(PY) benchmarks/decoy_digits.py --out benchmarks/results/decoy_digits.json
	$(PY) benchmarks/diagnostics_cost.py --out benchmarks/results/diagnostics_cost.json
	$(PY) benchmarks/lipschitz_cost.py --out benchmarks/results/lipschitz_cost.json
	$(PY) benchmarks/finetune_memory.py --out benchmarks/results/finetune_memory.json
	$(PY) benchmarks/data_throughput.py --out benchmarks/results/data_throughput.json
	$(PY) benchmarks/maco_cost.py --model digits --out benchmarks/results/maco_cost.json
	$(PY) benchmarks/eva_cost.py --out benchmarks/results/eva_cost.json
	$(PY) benchmarks/atlas_cost.py --out benchmarks/results/atlas_cost.json

## Headless Chromium for the atlas's browser tests (Debian packages; needs root or sudo).
## Without it those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver are installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; \
	elif command -v sudo >/dev/null; then \
	  sudo apt-get install -y -q chromium chromium-driver || { sudo apt-get update -q && sudo apt-get install -y -q chromium chromium-driver; }; \
	else \
	  echo "make browser: cannot install chromium (not root, no sudo); the browser tests will skip"; \
	fi

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
