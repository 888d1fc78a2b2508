# The two commands a new user types: `make demo` and `make test`.
# Both create .venv on first use and install the pinned, known-good stack into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= cpu,dev
export HF_HUB_OFFLINE := 1

.PHONY: test demo install slurm-deps clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/conceptprune demo --out demo_out

# Debian packages for the localhost SLURM test cluster (root; CI does this).
slurm-deps:
	bash tests/slurm_cluster.sh install

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
