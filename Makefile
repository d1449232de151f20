# pfld-export: every target sets itself up (`install` is idempotent and fast when done).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: install test test-slow test-all demo bench bench-arm arm-rig test-arm check clean help

help:
	@echo "make demo       train a small PFLD on synthetic faces, convert it to TFLite (fp32/int8), print the report"
	@echo "make test       install and run the default test suite"
	@echo "make test-slow  the slow end-to-end conversions on the real fixtures"
	@echo "make bench      host latency benchmark -> benchmarks/results/"
	@echo "make bench-arm  MODEL=... [SERIAL=...] [BENCHMARK_MODEL=...] latency on an adb device"
	@echo "make check      size / latency / accuracy regression gate against models/baselines.json"

install: $(STAMP)

# requirements.lock is the exact, tested environment; --no-deps keeps pip's resolver out of it
# (onnx2tf and tf-keras declare requirements that would pull full tensorflow).
$(STAMP): requirements.lock setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

test: install
	$(PYTEST) -q

test-slow: install
	$(PYTEST) -q -m slow

test-all: install
	$(PYTEST) -q -m "slow or not slow"

clean:
	rm -rf $(VENV) build *.egg-info demo_out

# --- targets added by later stages, one block each (keep them self-contained) ---
# [demo]
# [bench]
# [bench-arm]
# [arm-rig]
# [check]
