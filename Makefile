# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the default 4-hospital simulation on Br35H
#   make test   - create .venv, install, run the offline test suite
#
# The DINOv2 hub is unreachable on air-gapped machines, so the demo's teacher
# is a make variable. The default is a PROXY teacher (a resnet18 trained on a
# public pool no hospital receives; every output says PROXY); for the real
# DINOv2 pass hub weights or a local file:
#   make demo TEACHER_WEIGHTS=hub
#   make demo TEACHER_WEIGHTS=file:/models/dinov2_vits14_pretrain.pth
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEACHER_WEIGHTS ?= proxy
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean-runs

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,export]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m simulations.demo \
	  --teacher $(TEACHER_WEIGHTS) --out $(DEMO_OUT) $(DEMO_ARGS)

test: venv
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m benchmarks.run_all
