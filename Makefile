# The two commands of the README: `make train` (main job) and `make test` (test suite).
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (auto = one per core, at most 8); TEST_WORKERS=0: serial
TEST_WORKERS ?= auto

.PHONY: install train sample test test-fast lint notebooks bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Both stages on the embedded MNIST-5k data; ends with a sample grid and an FID.
train: install
	$(BIN)/python train.py $(ARGS)

sample: install
	$(BIN)/python sample.py $(ARGS)

# The whole suite, slow end-to-end tests included (pytest exit 5 = "no tests ran" is a failure).
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 8 --dist loadscope $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The .ipynb from their jupytext sources notebooks/*.py (cell ids kept, no outputs).
notebooks: install
	$(BIN)/jupytext --update --to ipynb notebooks/0*.py

bench-quick: install
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) logs outputs wandb .pytest_cache .ruff_cache
