# Two commands matter: `make demo` and `make test`. Both create .venv/ on first use.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep Ray on loopback (otherwise it advertises the machine's external address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test lint format clean sanitize

install: $(STAMP)

# Re-installs only when pyproject.toml changes. torchvision & co. are removed: vLLM's CPU
# build does not need them, and the torchvision pip picks beside torch 2.13 fails at import.
$(STAMP): pyproject.toml workers/answers/_topk.c workers/answers/_json_scan.h workers/answers/_prompt_scan.h workers/answers/_tail.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[teacher,dev,train,report]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>&1 | { grep -v "not installed" || true; }
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -rfE --durations=25

# The parser's compiled core under AddressSanitizer + UBSan: its tests and a fuzz of real
# bodies (scripts/sanitize.sh; ~1 min). A finding aborts the run.
sanitize: install
	PYTHON=$(BIN)/python scripts/sanitize.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache out
