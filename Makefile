# DealStream: `make run` starts everything on embedded defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install browser run test test-unit chaos bench bench-latency lint vendor clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "DealStream needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# The dashboard's browser test drives Debian's Chromium (and a CJK font for the Chinese page).
browser:
	@command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi wenquanyi || { \
	  echo "installing Debian's chromium and fonts-wqy-microhei for the browser test"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei >/dev/null \
	  || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends \
	       chromium fonts-wqy-microhei >/dev/null; }; }

run: install
	$(VENV)/bin/dealstream dev

test: install browser
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q tests/unit

# The crash and fault suite in full (tests/chaos): kills, a fresh broker, a PostgreSQL crash under
# load; prints the counts and fails on any loss or duplicate. `make test` runs a shortened form.
chaos: install
	$(PY) -m tests.chaos $(CHAOS_ARGS)

bench: install
	$(PY) -m tests.perf.bench

bench-latency: install
	$(PY) -m tests.perf.latency

lint: install
	$(VENV)/bin/ruff check shared services tests
	$(VENV)/bin/ruff format --check shared services tests
	$(VENV)/bin/mypy shared services/*/domain.py services/pipeline/rules.py

# Refresh the dashboard's vendored chart library from the npm registry (version in its package.json).
vendor:
	cd services/reporting/static && rm -rf .pack && mkdir .pack && cd .pack \
	  && npm pack --silent chart.js@$$(python3 -c 'import json; print(json.load(open("../package.json"))["dependencies"]["chart.js"])') \
	  && tar xzf chart.js-*.tgz && cp package/dist/chart.umd.min.js .. && cp package/LICENSE.md ../chart.js.LICENSE.md \
	  && cd .. && rm -rf .pack

clean:
	rm -rf $(VENV) .dealstream test-artifacts bench-results.json
