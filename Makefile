# The two commands: `make demo` (set up, then the end-to-end job) and `make test` (set up, then every test).
# For the inner loop, `make test-fast` leaves out the tests marked slow (pytest -m "not slow").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast setup system-deps clean

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

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
