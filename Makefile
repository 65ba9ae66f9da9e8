# Two entry points (see README): `make demo` runs the quickstart experiment, `make test` the test suite.
# Both create .venv when missing and (re)install when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint docs bench system-deps clean

demo: $(VENV)/.installed system-deps
	$(BIN)/slam-ray run quickstart

# pytest's exit code 5 (no tests collected) fails on purpose rather than passing silently.
PYTEST = rc=0; $(BIN)/python -m pytest $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

# Two pytest processes side by side: the `ray` tests in one, the rest in the other (tests/lanes.py says why);
# each lane fails on exit code 5 too.
test: $(VENV)/.installed-dev system-deps
	@$(BIN)/python tests/lanes.py --durations=25

# The development loop: no Ray instance, no subprocess pipeline, no training run (markers `ray` and `slow`).
test-fast: $(VENV)/.installed-dev system-deps
	@$(call PYTEST,-m "not ray and not slow" tests)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check slam_ray tests bench

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns a broken link into a failure.
docs: $(VENV)/.installed-dev
	$(BIN)/python -m mkdocs build --strict

# espeak-ng is a Debian package (the default offline TTS engine).
system-deps:
	@command -v espeak-ng >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng)

$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)

# torch 2.14.1 and torchaudio 2.11.0 resolve together in this one pip command (pins in pyproject.toml).
# (The grep drops pip's warnings about this machine's empty local index folders.)
PIP_INSTALL = set -o pipefail; $(BIN)/pip install -q
QUIET = 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/pip
	$(PIP_INSTALL) -e . $(QUIET)
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/pip
	$(PIP_INSTALL) -e ".[dev]" $(QUIET)
	touch $@ $(VENV)/.installed

clean:
	rm -rf slam_runs bench_out .pytest_cache
