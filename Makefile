# The two commands: `make demo` (set up, then the end-to-end job) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup system-deps clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
