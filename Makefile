# ICE serving: the two commands a newcomer runs are `make demo` and `make test`; each does its own set-up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMPS := .stamps
BUNDLE ?= build/tiny-bundle
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help install protos protos-check bundle demo demo-tiny toy-train toy-eval quality test bench scale-check gpu-check device-wheels gpu-check-dry-run lint k8s-validate clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

# --- set-up: re-running is quick when pyproject.toml did not change -------------------------------------
$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@touch $@

# torch first, pinned, so that nothing later pulls another (multi-GB) build.
$(STAMPS)/torch: $(STAMPS)/venv
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	@touch $@

# the services (.) depend on the SDK's own distribution (./client: no torch), installed in the same resolve
$(STAMPS)/install: $(STAMPS)/torch pyproject.toml client/pyproject.toml
	$(PIP) install -e ./client -e '.[dev]'
	@# a .venv made before the split: removing the old ice-serving took the `ice` script ice-client had just put
	@test -x $(VENV)/bin/ice || $(PIP) install --no-deps --force-reinstall -e ./client
	@touch $@

install: $(STAMPS)/install  ## create .venv and install the project with its dev extras

protos: $(STAMPS)/install  ## regenerate the Python code of protos/**/*.proto
	$(PY) protos/generate.py

protos-check: $(STAMPS)/install  ## fail when the generated code is stale
	$(PY) protos/generate.py --check

# --- the tiny random bundle (deterministic; its outputs carry no meaning) ------------------------------
$(BUNDLE)/bundle.json: $(STAMPS)/install $(wildcard services/common/*bundle*.py services/common/tokenizer.py services/common/data/*)
	$(VENV)/bin/ice-bundle tiny --out $(BUNDLE) --force

bundle: $(BUNDLE)/bundle.json  ## build the tiny bundle into build/tiny-bundle
	$(VENV)/bin/ice-bundle verify $(BUNDLE)

# --- ToyWorld: the trained bundle committed in toyworld/bundle, and the scripts that make and measure it -----
TOY_BUNDLE := toyworld/bundle

demo: $(STAMPS)/install  ## start the 3 services on loopback, extract a held-out ToyWorld scene, write a report
	$(PY) -m client.demo --bundle $(TOY_BUNDLE) --out build/demo

demo-tiny: bundle  ## the same with the tiny random bundle on a real photo (every step runs; nothing means anything)
	$(PY) -m client.demo --bundle $(BUNDLE) --out build/demo-tiny

toy-train: $(STAMPS)/install  ## train the ToyWorld models, assemble toyworld/bundle (resumable; hours on 2 CPU cores)
	$(PY) -m toyworld.train all

toy-eval: $(STAMPS)/install  ## measure the ToyWorld bundle: generation, CLIP, stage 1 -> bench/results/toyworld.json
	$(PY) -m toyworld.evaluate

quality: $(STAMPS)/install  ## ICE, its ablations and two peer baselines on ToyWorld, through the services (hours, resumable; --quick: a smoke run)
	$(PY) bench/quality.py $(QUALITY_ARGS)

# the report tests render HTML in headless Chromium (Debian's package)
$(STAMPS)/chromium:
	@mkdir -p $(STAMPS)
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@touch $@

# Node.js and npm (Debian's packages) for the npm packages below
$(STAMPS)/node:
	@mkdir -p $(STAMPS)
	command -v npm >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@touch $@

# the Node.js client of the contract and the buf CLI (tests/interop): npm packages from the committed lock file
$(STAMPS)/npm: tests/interop/node/package-lock.json $(STAMPS)/node
	cd tests/interop/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Azurite, the Azure Storage emulator that `ice batch` over az:// is tested against (tests/azurite, from its lock
# file); pinned at 3.35.0, the last release that runs on Debian's Node.js 20 (later ones need Node 21 or 22)
$(STAMPS)/azurite: tests/azurite/package-lock.json $(STAMPS)/node
	cd tests/azurite && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test: $(STAMPS)/install $(STAMPS)/chromium $(STAMPS)/npm $(STAMPS)/azurite k8s-validate  ## run the whole test suite
	$(PY) -m pytest -q

k8s-validate: $(STAMPS)/install  ## render every k8s overlay and Job; validate with kubernetes-validate --strict
	KUBERNETES_VALIDATE=$(VENV)/bin/kubernetes-validate k8s/validate.sh

bench: $(STAMPS)/install  ## run every benchmark, print ratios, write bench/results/latest.json
	$(PY) bench/run.py

scale-check: $(STAMPS)/install  ## SD-2.1-size random weights through the 3 services: time + peak memory per stage (~20 min, 20 GB)
	$(PY) bench/scale_check.py $(SCALE_CHECK_ARGS)

gpu-check: $(STAMPS)/install  ## on a CUDA machine: bf16 train steps/s, Triton vs compiled KL, localizer round, one extraction
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The lent GPU machine has no network and not every package (bench/device_packages.txt): these wheels travel with
# the tree (.whl/, git-ignored; about 8 MB) and bench/gpu_check_device.sh installs them there.
device-wheels: $(STAMPS)/install  ## download the wheels the GPU check carries to the lent GPU machine into .whl/
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl -r bench/device_wheels.txt

# the GPU machine's check, dry-run on a CPU in a fresh Python 3.12 venv holding only that machine's packages
gpu-check-dry-run: device-wheels  ## bench/gpu_check_device.sh --device cpu --quick in a venv shaped like the GPU machine
	bench/device_venv.sh build/device-venv
	PYTHON=build/device-venv/bin/python OUT=build/gpu-check-dry-run bash bench/gpu_check_device.sh --device cpu --quick

lint: $(STAMPS)/install  ## ruff
	$(VENV)/bin/ruff check .

clean:  ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache
