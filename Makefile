# Every target sets itself up: uv is bootstrapped into .uv-boot/ when missing, and .venv is
# created from uv.lock (frozen: the lock is the single source of versions).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .uv-boot/bin/uv)
# The digits demo (README, "What make train does"); CONFIG=configs/x.yaml for another, CONFIG= for the bare defaults.
CONFIG ?= configs/digits-16px.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help browser install test-cuda-variants train sample test test-slow lint format bench bench-gpu submit-train submit-prepare submit-sweep submit-upload nightly-install cluster-up cluster-down image sif image-test test-reliability

help:
	@echo "make install [CUDA=12|13]                                 .venv from uv.lock; CUDA: 12 for drivers 525+ (default), 13 for 580+"
	@echo "make train [CONFIG=configs/x.yaml] [ARGS='key=value ...']   train (resumes an existing run)"
	@echo "make test                                                  the fast suite, on every core (under 10 min on 2 cores)"
	@echo "make test-slow                                             the long variants: SLURM cluster, fault injection (CI runs both)"
	@echo "make lint / format                                         ruff: check formatting and lint / fix them"
	@echo "make sample [PIPELINE=runs/<name>/pipeline]               64 images, default sampler; from runs/digits-16px, else the newest export"
	@echo "make bench [ARGS=--quick|--ablation|--sampling|--guidance] speed figures (bench/), appended to docs/benchmarks.md"
	@echo "make bench-gpu [ARGS=--quick]                             GPU figures: training MFU, sampling at batch 256"
	@echo "make submit-train CLUSTER=local [CONFIG=...] [NODES=2]     multi-node training on SLURM (submitit)"
	@echo "make submit-prepare CLUSTER=local [CONFIG=...] [TASKS=4]   decode the data on CPU nodes; then submit-train AFTER=id"
	@echo "make submit-sweep CLUSTER=local SWEEP=configs/sweeps/x.yaml  sampling sweep as a SLURM array + merge"
	@echo "make submit-upload CLUSTER=local PIPELINE=... REPO=user/name [AFTER=jobid]  Hub upload after training"
	@echo "make cluster-up / cluster-down                             the local two-node SLURM cluster (root; slurm/dev/)"
	@echo "make nightly-install CLUSTER=local NIGHTLY=slurm/nightly.yaml  nightly sweep of the newest checkpoints"
	@echo "make test-reliability                                      the fault-injection suite with its long variants (20 kills in a row)"
	@echo "make image [CUDA=12|13] [BASE_IMAGE=...] [CA_BUNDLE=pem]    the OCI image ddpm:latest (docker, podman or buildah)"
	@echo "make sif                                                   ddpm.sif (Apptainer) from that image"
	@echo "make image-test                                            build on a debootstrapped Debian base and smoke-run (root, buildah)"

.uv-boot/bin/uv:
	$(PYTHON) -m venv .uv-boot
	.uv-boot/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"

# The CUDA generation of torch (pyproject's extras cu12/cu13; README, "Which CUDA"). Given once, it is remembered
# in .venv/.cuda for later targets; 12 (drivers 525+) unless told.
CUDA ?= $(or $(shell cat .venv/.cuda 2>/dev/null),12)
ifeq ($(filter 12 13,$(CUDA)),)
$(error CUDA=$(CUDA): choose 12 (NVIDIA driver 525 or newer) or 13 (driver 580 or newer))
endif

.venv/.synced-cu$(CUDA): uv.lock pyproject.toml | $(if $(filter .uv-boot/bin/uv,$(UV)),.uv-boot/bin/uv)
	$(UV) sync --frozen --extra cu$(CUDA)
	@rm -f .venv/.synced*; echo $(CUDA) > .venv/.cuda; touch $@

install: .venv/.synced-cu$(CUDA)

# Both CUDA generations install from uv.lock and train a few steps on the CPU, each in its own environment (CI).
test-cuda-variants: $(if $(filter .uv-boot/bin/uv,$(UV)),.uv-boot/bin/uv)
	@set -e; tmp=$$(mktemp -d); for c in 12 13; do \
		UV_PROJECT_ENVIRONMENT=.venv-cu$$c $(UV) sync --frozen --no-dev --extra cu$$c; \
		.venv-cu$$c/bin/python -c "import torch; print('CUDA=$$c: torch', torch.__version__, 'built for CUDA', torch.version.cuda)"; \
		$(TEST_ENV) .venv-cu$$c/bin/ddpm train name=smoke-cu$$c runs_dir=$$tmp/runs data.cache_dir=$$tmp/cache \
			train.max_steps=4 train.sample_images=4 train.sample_steps=2 train.eval_images=16 tracking.wandb=false >$$tmp/cu$$c.log 2>&1 \
			|| { tail -20 $$tmp/cu$$c.log; exit 1; }; \
		.venv-cu$$c/bin/ddpm sample --pipeline $$tmp/runs/smoke-cu$$c/pipeline --num-images 4 --steps 2 >>$$tmp/cu$$c.log 2>&1 \
			|| { tail -20 $$tmp/cu$$c.log; exit 1; }; \
		echo "CUDA=$$c: trained 4 steps and sampled on the CPU"; \
	done; rm -rf $$tmp

train: install
	.venv/bin/ddpm train $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# make sample's model: PIPELINE= as given; else the README's default run (what make train writes) when it has been
# exported; else the newest export under runs/ (by the mtime of its model_index.json). The choice is printed first.
PIPELINE ?=
DEFAULT_PIPELINE := runs/digits-16px/pipeline
sample: install
	@if [ -n '$(PIPELINE)' ]; then p='$(PIPELINE)'; why='as given'; \
	elif [ -f $(DEFAULT_PIPELINE)/model_index.json ]; then p=$(DEFAULT_PIPELINE); why="the default run, make train's"; \
	else p=$$(ls -t runs/*/pipeline/model_index.json 2>/dev/null | head -n 1); p=$${p%/model_index.json}; why='the newest export'; fi; \
	if [ -z "$$p" ]; then echo "make sample: no exported pipeline under runs/: run make train, or give PIPELINE=runs/<name>/pipeline" >&2; exit 2; fi; \
	echo "make sample: sampling $$p ($$why; PIPELINE=... to choose)"; \
	.venv/bin/ddpm sample --pipeline "$$p" $(ARGS)

# The tests need no network: the Hub is offline and W&B writes offline run files. -n: one pytest worker per core.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
test: install
	$(TEST_ENV) .venv/bin/python -m pytest -n $(WORKERS) $(PYTEST_ARGS)

# Headless Chromium, for the test that opens a `ddpm compare` report as a browser does (apt-get, as root; CI runs it).
browser:
	@command -v chromium >/dev/null || { apt-get -o DPkg::Lock::Timeout=300 update -qq && \
		apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null; }
	@chromium --version

# The long variants (marked slow): the SLURM cluster tests (make cluster-up first) and multi-minute fault injection.
test-slow: install
	$(TEST_ENV) .venv/bin/python -m pytest -m slow $(PYTEST_ARGS)

lint: install
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Speed against the tutorial's way, in one run; the sampling figures need the default model (make train).
BENCH_OUT ?= docs/benchmarks.md
# Every fault-injection test, the slow variants too; the counts go to reliability-report.jsonl (docs/reliability.md).
test-reliability: install
	rm -f reliability-report.jsonl
	$(TEST_ENV) DDPM_RELIABILITY_REPORT=$(CURDIR)/reliability-report.jsonl \
		.venv/bin/python -m pytest tests/test_reliability.py tests/test_upload.py -m "slow or not slow" $(PYTEST_ARGS)

# GPU figures (bench/gpu.py): training img/s and MFU at 32 and 64 px, sampling at batch 256; under 8 min on an H100.
bench-gpu: install
	.venv/bin/python -m bench.gpu $(if $(findstring --quick,$(ARGS)),,--out $(BENCH_OUT)) $(ARGS)

bench: install
	@if [[ "$(ARGS)" != *--quick* && ! -f runs/digits-16px/pipeline/model_index.json ]]; then $(MAKE) train; fi
	.venv/bin/python -m bench $(if $(findstring --quick,$(ARGS)),,--out $(BENCH_OUT)) $(ARGS)

# SLURM: submitit jobs from a snapshot of this commit; see docs/slurm.md. WAIT=1 blocks until the jobs end.
# No default cluster: a submission goes where it is told (CLUSTER=local is the dev cluster of slurm/dev).
CLUSTER ?=
need_cluster = @test -n "$(CLUSTER)" || { echo "make $@: give CLUSTER=<profile>, one of: \
	$$(ls slurm/clusters | sed -n 's/\.yaml$$//p' | tr '\n' ' ')(slurm/clusters/), or a path to a profile .yaml" >&2; exit 2; }
NODES ?=
SWEEP ?= configs/sweeps/digits.yaml
REPO ?=
AFTER ?=
NIGHTLY ?= slurm/nightly.yaml
submit-train: install
	$(need_cluster)
	.venv/bin/ddpm submit train --cluster $(CLUSTER) $(if $(CONFIG),--config $(CONFIG)) $(if $(NODES),--nodes $(NODES)) $(if $(AFTER),--after $(AFTER)) $(if $(WAIT),--wait) $(ARGS)

# Decode the training data on CPU nodes first (TASKS array tasks); then make submit-train AFTER=<its job id>.
TASKS ?= 4
submit-prepare: install
	$(need_cluster)
	.venv/bin/ddpm submit prepare --cluster $(CLUSTER) $(if $(CONFIG),--config $(CONFIG)) --tasks $(TASKS) $(if $(WAIT),--wait) $(ARGS)

submit-sweep: install
	$(need_cluster)
	.venv/bin/ddpm submit sweep --cluster $(CLUSTER) --config $(SWEEP) $(if $(WAIT),--wait) $(ARGS)

# No default model here: an upload of the wrong model is worse than none.
submit-upload: install
	$(need_cluster)
	@test -n '$(PIPELINE)' || { echo "make submit-upload: give PIPELINE=<the export to upload>, e.g. PIPELINE=$(DEFAULT_PIPELINE)" >&2; exit 2; }
	.venv/bin/ddpm submit upload --cluster $(CLUSTER) --pipeline $(PIPELINE) --repo-id $(REPO) $(if $(AFTER),--after $(AFTER)) $(if $(WAIT),--wait) $(ARGS)

nightly-install: install
	$(need_cluster)
	.venv/bin/ddpm nightly install --cluster $(CLUSTER) --runs $(NIGHTLY)

# A real two-node SLURM cluster on this machine (network + UTS namespaces), for development and the tests.
cluster-up:
	slurm/dev/cluster.sh up

cluster-down:
	slurm/dev/cluster.sh down

# Containers: containers/Dockerfile (OCI) and containers/ddpm.def (Apptainer, bootstrapped from the OCI image).
IMAGE ?= ddpm:latest
# The first engine that answers (a docker client without a daemon does not count); evaluated only by these targets.
ENGINE ?= $(shell for e in docker podman buildah; do command -v $$e >/dev/null 2>&1 && $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# The revision is also given as --label: buildah and podman (buildah 1.28 at least) reuse a cached LABEL layer whose
# build argument changed, so a commit that touches no copied file would keep the previous commit's revision label.
BUILD_ARGS = --build-arg CUDA=$(CUDA) --build-arg GIT_SHA=$(GIT_SHA) --build-arg LOCK_SHA256=$(shell sha256sum uv.lock | cut -d' ' -f1) \
	--label org.opencontainers.image.revision=$(GIT_SHA) \
	$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE))
comma := ,

image:
	@test -n "$(ENGINE)" || { echo "make image: no docker, podman or buildah on this machine" >&2; exit 1; }
	$(if $(filter buildah,$(ENGINE)),buildah bud --layers,$(ENGINE) build) -f containers/Dockerfile -t $(IMAGE) $(BUILD_ARGS) .

sif:
	@command -v apptainer >/dev/null || { echo "make sif: apptainer is not installed here; build the .sif on a cluster node from an archive (docs in containers/ddpm.def)" >&2; exit 1; }
ifeq ($(ENGINE),docker)
	apptainer build --force ddpm.sif containers/ddpm.def
else
	rm -f ddpm.tar && $(ENGINE) push $(IMAGE) docker-archive:ddpm.tar:$(IMAGE)
	apptainer build --force --build-arg BOOTSTRAP=docker-archive --build-arg FROM=ddpm.tar ddpm.sif containers/ddpm.def
endif

image-test:
	containers/image-test.sh
