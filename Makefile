# The two commands a new user types: `make demo` and `make test`.
# Both create .venv on first use and install the pinned, known-good stack into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= cpu,dev
export HF_HUB_OFFLINE := 1

.PHONY: test demo install deps slurm-deps clean bench

# Debian packages the stack needs: protoc + protobuf headers to build gcld3 (DataComp's language
# ID for laion2b; pip compiles it from source), WordNet 3.0 for the text-based filter.
DEB_DEPS := protobuf-compiler libprotobuf-dev wordnet-base

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/conceptprune demo --out demo_out

# Installs $(DEB_DEPS) with apt-get when some are missing (needs root; otherwise it says what to run).
deps:
	@command -v dpkg-query >/dev/null || { echo "make deps: not Debian; install protoc, the protobuf headers and WordNet 3.0 yourself" >&2; exit 0; }; \
	missing=""; for p in $(DEB_DEPS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ]; then echo "make deps: missing Debian packages:$$missing; run 'sudo make deps' (or sudo apt-get install$$missing)" >&2; exit 1; fi; \
	echo "make deps: apt-get install$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null

# Debian packages for the localhost SLURM test cluster (root; CI does this).
slurm-deps:
	bash tests/slurm_cluster.sh install

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
