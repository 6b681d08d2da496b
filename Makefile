# Two entry points: `make demo` and `make test`. Both create .venv on first use
# and re-install only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

# A .venv that cannot run pip or holds another Python (a failed first `make` on a system without
# python3-venv, or one made by python3.10) is made again, not failed on at every run.
$(STAMP): pyproject.toml
	$(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/harp pipeline --dataset digits --sparsity 0.99 --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
