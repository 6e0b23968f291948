# Every target sets itself up: uv is bootstrapped into .uv-boot/ when missing, and .venv is
# created from uv.lock (frozen: the lock is the single source of versions).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .uv-boot/bin/uv)
CONFIG ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train sample test bench

help:
	@echo "make train [CONFIG=configs/x.yaml] [ARGS='key=value ...']   train (resumes an existing run)"
	@echo "make test                                                  run the test suite"
	@echo "make sample PIPELINE=runs/<name>/pipeline                 sample 64 images with DDIM, 25 steps"
	@echo "make bench [ARGS=--quick]                                 speed figures, appended to docs/benchmarks.md"

.uv-boot/bin/uv:
	$(PYTHON) -m venv .uv-boot
	.uv-boot/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"

.venv/.synced: uv.lock pyproject.toml | $(if $(filter .uv-boot/bin/uv,$(UV)),.uv-boot/bin/uv)
	$(UV) sync --frozen
	@touch $@

install: .venv/.synced

train: install
	.venv/bin/ddpm train $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

PIPELINE ?= $(firstword $(wildcard runs/*/pipeline))
sample: install
	.venv/bin/ddpm sample --pipeline $(PIPELINE) --scheduler ddim --steps 25 --num-images 64 --seed 0 $(ARGS)

# The tests need no network: the Hub is offline and W&B writes offline run files.
test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true .venv/bin/python -m pytest $(PYTEST_ARGS)

# Speed against the tutorial's way, in one run; the sampling figures need the default model (make train).
BENCH_OUT ?= docs/benchmarks.md
bench: install
	@if [[ "$(ARGS)" != *--quick* && ! -f runs/digits-16px/pipeline/model_index.json ]]; then $(MAKE) train; fi
	.venv/bin/ddpm bench $(if $(findstring --quick,$(ARGS)),,--out $(BENCH_OUT)) $(ARGS)
