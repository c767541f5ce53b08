# octlightning: set-up, tests, training runs. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= hparams/vessel_unet.json
ARGS   ?=
DRIVE  ?= ../shared/data/drive

# A short CPU-sized run of the vessel recipe: narrow U-Net, 128 px patches, eight epochs (validation
# Dice 0.46-0.62 after 8 epochs on DRIVE in our runs; 2 minutes on 2 idle CPU cores, 5-8 when loaded).
DEMO_ARGS = --trainer.max_epochs 8 --trainer.check_val_every_n_epoch 1 --overlay_every_n_epochs 1 \
	--model.init_args.net.init_args.base_channels 16 --data.init_args.patch_size 128 \
	--data.init_args.patches_per_image 4 --data.init_args.batch_size 8 --experiment demo_vessel_unet

.PHONY: install test lint demo fit
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check octlightning tests benchmarks

demo: install
	@if [ -d "$(DRIVE)/training" ]; then \
		echo "demo: training the vessel U-Net on the DRIVE training set in $(DRIVE)"; data="$(DRIVE)"; \
	else \
		echo "demo: $(DRIVE) not found, generating a small SYNTHETIC DRIVE-layout set in demo_data/drive"; \
		$(BIN)/python -m octlightning.convert synthetic drive demo_data/drive; data=demo_data/drive; \
	fi; \
	$(BIN)/octlightning fit --config hparams/vessel_unet.json --data.init_args.root "$$data" $(DEMO_ARGS) $(ARGS)

fit: install
	$(BIN)/octlightning fit --config $(CONFIG) $(ARGS)

# Throughput benchmarks (by hand or on a GPU machine; never in CI). See benchmarks/bench.py.
.PHONY: bench bench-cpu
bench: install
	$(BIN)/python benchmarks/bench.py $(ARGS)

bench-cpu: install
	$(BIN)/python benchmarks/bench.py --cpu $(ARGS)

# Accuracy on unseen data after a fixed CPU time budget per recipe (20 min per OCT recipe, ~1 h in
# all; by hand, never in CI). See benchmarks/accuracy_cpu.py; ARGS="--recipes oct" picks recipes.
.PHONY: accuracy-cpu
accuracy-cpu: install
	$(BIN)/python benchmarks/accuracy_cpu.py $(ARGS)

# The lent GPU machine has no network, no venv and no ../shared: its image has torch, lightning,
# transformers and timm; `make device-kit` (here, once) puts the other wheels and the shared data it
# needs into .device/ (git-ignored, ~52 MB), which device runs carry (`carry: [".device"]`). Then one
# device command each:
#   make device-check          everything at once, 9 minutes, report + curves under $OUT (README "Benchmarks")
#   make bench-device
#   make fit-device CONFIG=hparams/oct_segformer.json ARGS="--data.init_args.root .device/data/duke_dme/duke_dme_trainval.h5"
# SimpleITK is not on that image (nor in the kit): the RETOUCH recipes do not run there.
DEVICE_ENV = bash .device/whl/install.sh >&2 && PYTHONPATH=/tmp/site:$(CURDIR):$$PYTHONPATH
.PHONY: device-kit bench-device fit-device device-check device-rehearsal
device-kit: .device/.kit

# `rm -rf .device` to build it again (new wheels in ../shared/gpu-wheels, new data).
.device/.kit:
	bash ../shared/gpu-wheels/fetch.sh .device/whl
	mkdir -p .device/data && cp -r ../shared/data/drive ../shared/data/ph2_isic ../shared/data/duke_dme .device/data/
	chmod -R u+w .device
	@echo "device kit: $$(du -sh .device | cut -f1) (the device tool carries at most 64 MiB with the work tree)"
	touch $@

bench-device:
	$(DEVICE_ENV) python3 benchmarks/bench.py --shared-data .device/data $(ARGS)

fit-device:
	$(DEVICE_ENV) python3 -m octlightning fit --config $(CONFIG) $(ARGS)

device-check:
	$(DEVICE_ENV) python3 benchmarks/device_check.py --data .device/data $(ARGS)

# The same check on this CPU, tiny budgets, in a copy of the device image's Python stack: Python 3.12,
# the image's versions of torch (the same CUDA build: PyPI has no CPU-only 2.11 for Linux, 2.6 GB
# installed, about 2 minutes once), lightning, torchmetrics, transformers, numpy, no SimpleITK; the kit
# installed by its own install.sh into a --target folder that PYTHONPATH names, as on the device.
# The venv is cached outside the repo in $(REHEARSAL); delete it to rebuild.
PY312     ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
REHEARSAL ?= $(HOME)/.cache/octlightning-rehearsal
# Versions read off the device image (device tool's KINDS.md, 2026-11; timm's is not recorded there),
# and the image's packages that the kit's wheels need (comet-ml imports wrapt and simplejson).
IMAGE_PKGS = torch==2.11.0 torchvision==0.26.0 lightning==2.6.6 pytorch-lightning==2.6.6 torchmetrics==1.9.0 \
	transformers==5.17.0 huggingface_hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2 numpy==2.5.2 timm \
	h5py pillow scipy opencv-python-headless scikit-image pandas matplotlib pyyaml psutil rich requests \
	wrapt simplejson attrs certifi urllib3 setuptools
REHEARSAL_ENV = PATH=$(REHEARSAL)/venv/bin:$$PATH

$(REHEARSAL)/venv/.installed: Makefile
	@test -n "$(PY312)" || { echo "device-rehearsal needs python3.12 (set PY312=/path/to/python3.12)"; exit 1; }
	test -x $(REHEARSAL)/venv/bin/python || $(PY312) -m venv $(REHEARSAL)/venv
	$(REHEARSAL)/venv/bin/pip install -q $(IMAGE_PKGS)
	@! $(REHEARSAL)/venv/bin/python -c "import SimpleITK" 2>/dev/null || { echo "SimpleITK must be absent, as on the device image"; exit 1; }
	touch $@

device-rehearsal: .device/.kit $(REHEARSAL)/venv/.installed
	rm -rf $(REHEARSAL)/site
	$(REHEARSAL_ENV) SITE=$(REHEARSAL)/site bash .device/whl/install.sh >&2
	$(REHEARSAL_ENV) PYTHONPATH=$(REHEARSAL)/site:$(CURDIR) python3 benchmarks/device_check.py \
		--data .device/data --out runs/device-rehearsal --work runs/device-rehearsal-work $(ARGS)

# Sweeps (experiments/*.json): one run per GPU group, queued, resumable; see README "Sweeps".
# make sweep SWEEP=experiments/vessel_lr_batch.json GPUS=0,1,2,3   (no GPUS: CPU, ARGS="--slots 2")
SWEEP ?= experiments/vessel_lr_batch.json
GPUS  ?=
.PHONY: sweep sweep-dry sweep-slurm leaderboard
sweep: install
	$(BIN)/octlightning sweep $(SWEEP) $(if $(GPUS),--gpus $(GPUS)) $(ARGS)

sweep-dry: install
	$(BIN)/octlightning sweep $(SWEEP) --dry-run $(ARGS)

# ARGS=--submit submits the job array with sbatch
sweep-slurm: install
	$(BIN)/octlightning sweep $(SWEEP) --slurm $(ARGS)

leaderboard: install
	$(BIN)/octlightning sweep $(SWEEP) --report
