# dmm: `make demo` runs the main job, `make test` the test suite; both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test lint clean

setup: $(VENV)/.installed data

# The venv is rebuilt only when pyproject.toml changes (idempotent).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; skipped when DMM_DATA_DIR is set.
data:
	@if [ -z "$$DMM_DATA_DIR" ] && [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || { echo "make setup: could not install the Debian package dataset-fashion-mnist; install it or set DMM_DATA_DIR to a folder with the Fashion-MNIST idx files" >&2; exit 1; }; \
	  elif command -v sudo >/dev/null 2>&1; then \
	    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	      || { echo "make setup: could not install dataset-fashion-mnist with sudo; set DMM_DATA_DIR instead" >&2; exit 1; }; \
	  else \
	    echo "make setup: Fashion-MNIST is missing; as root run 'apt-get install dataset-fashion-mnist', or set DMM_DATA_DIR to a folder with its idx files" >&2; exit 1; \
	  fi; \
	fi

demo: setup
	$(VENV)/bin/dmm demo --out runs/demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
