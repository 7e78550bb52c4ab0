# Two commands for a fresh clone (see README):
#   make demo       installs into .venv, trains a small model on the built-in synthetic set and
#                   separates a held-out synthetic song (minutes on a laptop CPU; the plan is printed first)
#   make test       installs into .venv and runs the tests, less the few slow end-to-end ones (marked slow)
#   make test-all   the linter and every test: what CI runs
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all clean

demo: $(VENV)/.installed
	$(BIN)/python train.py --synthetic --epochs 8 --checkpoint-dir checkpoints/demo
	$(BIN)/python inference.py --synthetic --checkpoint checkpoints/demo/best_model.pth --output-dir outputs/demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) cache outputs checkpoints/demo
