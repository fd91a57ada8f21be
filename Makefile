# `make test` is the test command (README, .ci/run). It creates .venv if missing and installs the
# project with its test extra into it; the stamp file re-runs the install when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.odenet_timm-installed

.PHONY: install test bench demo cards clean

# pip byte-compiles the ~6 GB it installs on one core; compileall does the same work on every core (the .pyc files
# matter: without them every process compiles torch's modules again at import). It exits 1 on the few files written
# for newer Pythons (torch/testing/_internal/py312_intrinsics.py), which pip leaves uncompiled too.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --no-compile -e '.[test]'
	$(VPY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

# One pytest worker per core (at most 4); a test module stays on one worker, so its module-scoped fixtures
# (the per-family training runs) are computed once.
test: $(STAMP)
	$(VPY) -m pytest -n auto --maxprocesses 4 --dist loadfile

bench: $(STAMP)
	$(VPY) benchmarks/bench_models.py cifar_resnet_110 inresnet_110

# Train the four families on digits, evaluate them and an In-ResNet ensemble, print the leaderboard (demo/).
demo: $(STAMP)
	PYTHON=$(VPY) scripts/demo.sh

# Regenerate model_cards/ (one card per registered architecture) after adding or changing a model.
cards: $(STAMP)
	$(VPY) eval_robust.py --write-architecture-cards model_cards/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
