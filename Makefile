PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlmkit-installed
LATEST ?= .venv-latest
TORCHVISION_VENV ?= .venv-torchvision
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-latest test-torchvision demo lint format bench lock schema versions

$(STAMP): pyproject.toml scripts/install.sh requirements/lock-cpu.txt
	bash scripts/install.sh $(VENV) $(PYTHON)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)  ## fast offline suite (CI runs exactly this), at the locked versions
	$(BIN)/python -m pytest

demo: $(STAMP)  ## train the embedded tiny VLM on easy-VQA, evaluate it, leave a model to chat with
	$(BIN)/vlmkit demo

versions: $(STAMP)  ## what the environment runs with (CI prints it)
	@$(BIN)/python scripts/versions.py

lock:  ## regenerate requirements/lock-cpu.txt from pyproject.toml with the newest releases
	bash scripts/lock.sh

schema: $(STAMP)  ## rewrite src/vlmkit/hf_schema.json for the installed (locked) transformers; run after `make lock`
	$(BIN)/python -m vlmkit.hf_schema --write

test-latest:  ## the suite against the newest releases, unpinned, in $(LATEST) (finds breaks before users do)
	rm -f $(LATEST)/.vlmkit-installed
	LOCK=none bash scripts/install.sh $(LATEST) $(PYTHON)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements/cpu.in -e ".[all,dev]"
	@$(LATEST)/bin/python scripts/versions.py
	$(LATEST)/bin/python -m pytest

test-torchvision:  ## the tests that need torchvision (mistral3, LLaVA with a Pixtral tower; CI skips them), in $(TORCHVISION_VENV)
	[ -x $(TORCHVISION_VENV)/bin/python ] || $(PYTHON) -m venv $(TORCHVISION_VENV)
	# PyPI's torchvision does not import beside the CPU torch 2.13 build: torch 2.14.1 + torchvision
	# 0.29.1 (a CUDA build, ~5.5 GB, runs on the CPU), everything else at the lock's versions
	$(TORCHVISION_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	grep -v -E '^torch==' requirements/lock-cpu.txt >$(TORCHVISION_VENV)/constraints.txt
	$(TORCHVISION_VENV)/bin/python -m pip install -q -c $(TORCHVISION_VENV)/constraints.txt -e ".[all,dev]"
	$(TORCHVISION_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_families.py -k "mistral3 or pixtral"

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks
