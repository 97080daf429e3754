# Everything a fresh machine needs: `make serve` and `make test` set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=

.PHONY: serve test lint bench clean install chromium

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this disk, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,embeddings,ray]'
	touch $(STAMP)

install: $(STAMP)

# Headless browser for tests/e2e: Debian's chromium, installed only where it is missing and
# apt is there (never `playwright install`, which downloads its own build).
chromium:
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "warning: could not install chromium; tests/e2e will be skipped" >&2

serve: $(STAMP)
	# --deterministic: the playground's fixed-seed samples match even when run side by side
	$(BIN)/genserve serve --deterministic --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL),)

test: $(STAMP) chromium
	$(BIN)/ruff check genserve tests bench
	$(BIN)/ruff format --check genserve tests bench scripts
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check genserve tests bench
	$(BIN)/ruff format --check genserve tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
