# Set-up is two commands: `make train` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the newest releases the project allows (see pyproject.toml).
TORCH := "torch>=2.6,<=2.14.1" "torchvision>=0.21,<=0.29.1"
# the extras (pyproject.toml) the tests need, comma-separated: add new ones here
EXTRAS := dev,slurm,search,wandb,export,tensorboard,mlflow
PYTEST_ARGS ?=

.PHONY: install train test zoo bench gpu-check clean

install: $(STAMP)

# Quiet: pip's own messages (errors, warnings) and one line at the end; `make -n install` shows the commands.
$(STAMP): pyproject.toml constraints.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@$(PY) -m pip install --quiet $(TORCH)
	@# PYTHONWARNINGS: setuptools' editable-install notice (a 10-line BuildBackendWarning about folders named
	@# like the package) says nothing about this project; pip's own errors and warnings still print
	@PYTHONWARNINGS=ignore $(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)
	@echo "vitlab installed in $(VENV) (editable; configs from conf/)"

# The embedded default: pvt_v2_b0 learns generated ImageNet-format data on CPU (a few minutes).
train: install
	$(PY) src/train.py experiment=demo $(ARGS)

test: install
	# two pytest workers, one thread each: most tests are single-threaded subprocess runs
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

zoo: install
	$(PY) -m vitlab.tools.zoo

bench: install
	$(PY) -m vitlab.tools.bench pvt_v2_b0 pvt_v2_b2 --compare-timm

# The prepared first GPU run (README "Performance"): < 8 min on one H200; on a CPU its tiny version.
gpu-check: install
	$(PY) -m vitlab.tools.bench --suite gpu --json gpu-check.json

clean:
	rm -rf outputs multirun .pytest_cache
