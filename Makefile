# twisted-p2p developer tasks.  Everything runs from the project venv in .venv.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install samples demo test fuzz bench clean

install: $(VENV)/.installed

# editable_mode=compat: the default editable install hides twisted/plugins
# from twistd, so `twistd p2ppeer` would not be found.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install --config-settings editable_mode=compat -e '.[test]'
	touch $@

samples: install
	$(VPY) sandbox/make_samples.py

demo: install samples
	sandbox/demo.sh

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

# `make test` runs the Hypothesis properties with a fixed seed (see
# tests/conftest.py); this explores them with fresh random draws, one round
# after another, and stops at the first failure it finds.
FUZZ_ROUNDS ?= 5
FUZZ_TESTS = $(shell grep -l '@given' tests/test_*.py)
fuzz: install
	for i in $$(seq $(FUZZ_ROUNDS)); do \
	    $(VPY) -m pytest -q -x --hypothesis-profile=fuzz $(FUZZ_TESTS) || exit 1; \
	done

# The benchmarks print one table of figures against baselines measured in
# the same run (see tests/benchmarks/run --help); they take a few minutes.
BENCH_ARGS ?=
bench: install
	$(VPY) tests/benchmarks/run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	rm -f twisted/plugins/dropin.cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf sandbox/peer*/.p2ppeer
	rm -f sandbox/peer*/*.pid sandbox/peer*/*.log
	find sandbox -path 'sandbox/peer*/downloads/*' ! -name .gitkeep -delete
	rm -f sandbox/peer2/shared/random-32MiB.bin sandbox/peer3/shared/random-8MiB.bin
	rm -f sandbox/peer*/shared/*.partial
