# `make run` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench bench-large dev serve clean

$(STAMP): pyproject.toml web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the viewer's libraries (MapLibre GL, pmtiles, topojson-client, Natural Earth), published
	# into output/_lib/ with every snapshot; without npm the page says they are missing
	if command -v npm >/dev/null; then npm ci --prefix web --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the map page will lack its libraries (apt-get install npm)"; fi
	touch $@

install: $(STAMP)

run: $(STAMP)  ## extract, validate and publish the default hotspots.yaml
	$(BIN)/hotspots run

test: $(STAMP)  ## the whole test suite
	$(BIN)/pytest

lint: $(STAMP)  ## ruff: lint and format (`ruff format` fixes the format)
	$(BIN)/ruff check pipeline assets resources bench tests
	$(BIN)/ruff format --check pipeline assets resources bench tests

bench: $(STAMP)  ## benchmarks: print figures and ratios to baselines
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

bench-large: $(STAMP)  ## 100M world-spread reports in shards: wall time, peak RSS per process (<= 8 GB)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench large

serve: $(STAMP)  ## the viewer on http://127.0.0.1:8000/index.html
	$(BIN)/hotspots serve

dev: $(STAMP)  ## the Dagster UI on http://127.0.0.1:3000
	mkdir -p .hotspots/dagster
	DAGSTER_HOME=$(abspath .hotspots/dagster) $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf .hotspots output/*/ .pytest_cache
