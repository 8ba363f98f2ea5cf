# Two commands take a fresh machine to a result:  make demo  and  make test.
#
# Third-party packages (torch alone is several GB) live in one shared environment per
# dependency set, keyed by a hash of setup.cfg's requirements and the constraints file,
# under $(ENV_ROOT). Each clone gets a small .venv that sees that environment through a
# .pth file and holds only this project, installed in editable mode. `make env` registers the
# clone under $(ENV_ROOT)/clones; `make clean-envs` removes the environments no clone uses.

PYTHON ?= python3
PIP_CONSTRAINTS ?= requirements/constraints.txt
ENV_ROOT ?= $(HOME)/.cache/setdiff/envs
DEPS_HASH := $(shell $(PYTHON) tools/deps.py hash $(PIP_CONSTRAINTS))
ifeq ($(DEPS_HASH),)
$(error tools/deps.py could not name the dependency set (PIP_CONSTRAINTS=$(PIP_CONSTRAINTS)))
endif
DEPS_ENV := $(ENV_ROOT)/$(DEPS_HASH)
VENV := .venv
VPY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/demo_cpu.yaml
PYTEST_ARGS ?= --durations=25

.PHONY: env demo test test-fast system-deps clean-venv clean-envs
env: $(VENV)/.deps-$(DEPS_HASH)
	@$(PYTHON) tools/deps.py register $(ENV_ROOT) $(CURDIR)

$(DEPS_ENV)/.complete:
	mkdir -p $(ENV_ROOT)
	flock $(ENV_ROOT)/.lock sh -c '\
	  set -e; \
	  if [ ! -f $(DEPS_ENV)/.complete ]; then \
	    rm -rf $(DEPS_ENV); \
	    $(PYTHON) -m venv $(DEPS_ENV); \
	    $(DEPS_ENV)/bin/pip install -q --upgrade "pip>=24" "setuptools>=70" wheel; \
	    $(PYTHON) tools/deps.py requirements > $(DEPS_ENV)/requirements.txt; \
	    DS_BUILD_OPS=0 $(DEPS_ENV)/bin/pip install -c $(PIP_CONSTRAINTS) -r $(DEPS_ENV)/requirements.txt; \
	    touch $(DEPS_ENV)/.complete; \
	  fi'

$(VENV)/.deps-$(DEPS_HASH): $(DEPS_ENV)/.complete setup.cfg setup.py Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv --without-pip $(VENV)
	$(DEPS_ENV)/bin/python -c "import site; print(site.getsitepackages()[0])" > $(VENV)/deps-site.txt
	echo "import site; site.addsitedir('$$(cat $(VENV)/deps-site.txt)')" > \
	  $$($(VPY) -c "import site; print(site.getsitepackages()[0])")/setdiff-deps.pth
	$(VPY) -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	@# an editable install skips setup.py's start-up hook for `lm_eval --model setdiff`
	@# (pretrain/inference/lm_eval_hook.py): write it here, and put lm_eval's commands in .venv/bin
	echo "import pretrain.inference.lm_eval_hook" > \
	  $$($(VPY) -c "import site; print(site.getsitepackages()[0])")/setdiff-lm-eval.pth
	for cmd in lm_eval lm-eval; do \
	  printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m lm_eval "$$@"\n' > $(VENV)/bin/$$cmd; \
	  chmod +x $(VENV)/bin/$$cmd; \
	done
	touch $@

demo: env
	$(VENV)/bin/setdiff-prepare --embedded --out data/wiki
	$(VENV)/bin/setdiff-pretrain --config $(DEMO_CONFIG) --resume auto

test: env
	$(VPY) -m pytest $(PYTEST_ARGS)

# The unit tests only (markers in setup.cfg): under a minute, for the edit-test loop.
test-fast: env
	$(VPY) -m pytest -m unit $(PYTEST_ARGS)

# Debian packages some tests need beyond Python: a real one-node Slurm (munge, slurmctld,
# slurmd) for tests/e2e/test_slurm.py. Needs root; without them that test is skipped.
system-deps:
	@if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then \
	  echo "system-deps: slurm and munge present"; \
	else \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge; \
	fi

clean-venv:
	rm -rf $(VENV)

# The shared environments under $(ENV_ROOT) that no registered clone uses (a clone registers at
# `make env`; one that has not run it since cannot be known), never this clone's.
clean-envs:
	mkdir -p $(ENV_ROOT)
	$(PYTHON) tools/deps.py register $(ENV_ROOT) $(CURDIR)
	flock $(ENV_ROOT)/.lock $(PYTHON) tools/deps.py clean $(ENV_ROOT) $(DEPS_HASH)
