# Two entry points, both self-installing: `make demo` and `make test` (see README.md).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-dev browser demo test test-all

# torch first: keep a torch that is already there (a user's CUDA build); otherwise take
# torch 2.13.0, whose CPU wheel lies on disk on the project's CPU machines (a plain
# `pip install torch` there would pull a multi-GB CUDA build).
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0" || $(PIP) install torch
	$(PIP) install -e .

install-dev: install
	$(PIP) install -e ".[dev]"

# Debian's chromium for the browser test of the Gradio app (playwright's own browser
# download cannot work offline). Needs root; without it the browser test says why it skips.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the browser test will skip"; \
	fi

# The main job: recipes/demo.yaml, every stage on the embedded tiny model and a synthetic task (CPU,
# a few minutes). Run again, it skips the finished stages and prints the table again.
demo: install
	lowrank run recipes/demo.yaml

test: install-dev browser
	$(PYTHON) -m pytest -q -m "not slow" -n 2

test-all: install-dev browser
	$(PYTHON) -m pytest -q -n 2
