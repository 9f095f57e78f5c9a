# The two commands: `make demo` (set up, then the end-to-end job) and `make test` (set up, then every test).
# For the inner loop, `make test-fast` leaves out the tests marked slow (pytest -m "not slow").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast lint setup system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP) system-deps

system-deps:
	@scripts/system_deps.sh

demo: setup
	$(BIN)/hvs demo

# lint first: ruff's lint rules and formatting (configured in pyproject.toml), then every test
test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check hvs tests benchmarks
	$(BIN)/ruff format --check hvs tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
