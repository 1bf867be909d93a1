# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the default 4-hospital simulation on Br35H
#   make test   - create .venv, install, run the offline test suite
#
# The DINOv2 hub is unreachable on air-gapped machines, so the demo's teacher
# weights are a make variable. The default here is RANDOM-INIT (every output
# of such a run says so); for a real run pass hub weights or a local file:
#   make demo TEACHER_WEIGHTS=hub
#   make demo TEACHER_WEIGHTS=file:/models/dinov2_vits14_pretrain.pth
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEACHER_WEIGHTS ?= random
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
	@echo ">>> teacher.weights=$(TEACHER_WEIGHTS) (set TEACHER_WEIGHTS=hub or file:<path> for a real teacher)"
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m simulations.run \
	  --config simulations/configs/default.yaml \
	  --set teacher.weights=$(TEACHER_WEIGHTS) --set run.out_dir=$(DEMO_OUT) $(DEMO_ARGS)

test: venv
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m benchmarks.run_all
