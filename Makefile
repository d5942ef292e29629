# The two commands in the README: `make test` and `make reproduce`.
# Each creates a local virtualenv (.venv) if missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= results

.PHONY: test reproduce bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,peft]'
	touch $@

venv: $(VENV)/.installed

# The real-data tests (Table I exactness) are required: fetch MNIST first.
# So are the PEFT interop tests (torch, transformers, peft: the peft extra).
test: $(VENV)/.installed
	$(PY) -m blocklowrank.datasets --quiet
	BLOCKLOWRANK_TEST_REAL_DATA=1 BLOCKLOWRANK_TEST_PEFT=1 $(PY) -m pytest -q -p no:cacheprovider

reproduce: $(VENV)/.installed
	$(PY) -m blocklowrank.datasets
	$(PY) -m blocklowrank reproduce all --out $(OUT)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
