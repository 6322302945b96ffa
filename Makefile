# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MANIFEST ?= manifests/demo.yaml

.PHONY: demo test test-fast venv bench gpu-check clean

# The demo needs the package with CPU FAISS (`.[cpu]`; GPU machines: `.[gpu]` instead, never both);
# the tests add pytest and lvis (which pulls in OpenCV).
$(BIN)/regionclip: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu]"
	touch $@

$(VENV)/.test-extras: $(BIN)/regionclip
	$(BIN)/pip install --quiet -e ".[cpu,test]"
	touch $@

venv: $(BIN)/regionclip

# The run, then its page (report.html: builds the student's and the teacher's region indexes for search).
demo: venv
	$(BIN)/regionclip run $(MANIFEST)
	$(BIN)/regionclip report $(MANIFEST)

test: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q --durations=15 tests

# The fast tier: per-module tests, no whole stages, Ray jobs or killed processes.
test-fast: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q -m "not slow" tests

# Every quick figure, measured now into bench/results/latest.md (the demo's run feeds the scripts that read
# a trained teacher and RPN; it is reused when already complete). Take it on a quiet machine.
bench: demo
	$(BIN)/python bench/report.py

# The GPU paths on a machine with CUDA (at most 8 minutes on one H100; bench/gpu_check.py says what it runs),
# into runs/gpu-check/; without CUDA it says so and exits 0. An existing .venv is used as it is (installing
# `.[cpu]` over `.[gpu]` would mix two FAISS builds): FAISS runs on the GPU with the `gpu` extra installed.
gpu-check:
	test -x $(BIN)/pytest || $(MAKE) $(VENV)/.test-extras
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf runs
