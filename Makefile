# PhenoLens: `make demo` and `make test` work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns once per package about this machine's partial local mirrors; hide only that line.
QUIET_PIP := sed '/WARNING: Location .* is ignored/d'
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SETUP_STAMP := $(VENV)/.setup-stamp
ASSETS_STAMP := data/.assets-stamp
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.tools-stamp
CHECKOV := checkov==3.3.30

.PHONY: setup browser test tools demo serve bench lint proto container-test clean

setup: $(SETUP_STAMP) $(ASSETS_STAMP) browser

# Headless Chromium (Debian's package) for the match report's browser test: installed only
# where missing and where apt-get can (as root); elsewhere that one test skips and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium not installed: the report's browser test (tests/report) will skip"

$(SETUP_STAMP): requirements.txt requirements-nodeps.txt pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, from the local wheel directory: everything after
	# sees torch==2.13.0 already satisfied and never reaches for a CUDA build.
	$(PIP) install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(PIP) install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -r requirements-nodeps.txt 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -e ./client 2>&1 | $(QUIET_PIP)
	$(PIP) install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else 'wrong torch: ' + v)"
	touch $@

$(ASSETS_STAMP): $(SETUP_STAMP) encoder/assets.py
	$(PY) -m encoder.assets fetch
	touch $@

test: setup $(TOOLS_STAMP)
	$(PY) -m pytest -q tests

# Security scanners in their own virtualenv, so their many dependencies never touch
# the service's pinned requirements (tests/security uses it, skipping without it).
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q $(CHECKOV) 2>&1 | $(QUIET_PIP)
	touch $@

demo: setup
	$(PY) -m server.demo

# The default gallery starts with the demo's synthetic syndromes (built once, when it is
# missing or empty), so the README's snippet finds faces.
serve: setup
	$(PY) -m server.demo --build-gallery data/galleries/default.sqlite --if-empty
	$(VENV)/bin/phenolens serve

bench: setup
	$(PY) -m bench.run_all

lint: setup
	$(VENV)/bin/ruff check .

proto: setup
	$(PY) -m server.protogen

container-test: setup
	bash tests/container/run.sh

clean:
	rm -rf $(VENV) $(TOOLS_VENV) data/.assets-stamp demo-output
