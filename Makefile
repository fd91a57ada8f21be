# `make test` is the test command (README, .ci/run). It creates .venv if missing and installs the
# project with its test extra into it; the stamp file re-runs the install when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.odenet_timm-installed

.PHONY: install test bench demo cards clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest

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
