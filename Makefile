PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlmkit-installed
LATEST ?= .venv-latest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all test-latest demo lint format bench lock schema versions

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

lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks
