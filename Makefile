# The README's two commands: `make demo` and `make test`. Both set up everything
# themselves: a .venv in the repo root (pinned by constraints.txt), the model
# artifacts (cached under $(MODERATOR_CACHE_DIR)), and the local services.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MODERATOR_CACHE_DIR ?= $(HOME)/.cache/moderator

.PHONY: demo test venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,train,dev,pdq]'
	touch $@

# The demo model first (prints its held-out accuracy), then the streaming service itself:
# local Kafka + Redis, a worker, a few hundred events, a summary, everything stopped.
demo: venv
	$(PY) -m moderator.cli demo-model
	$(PY) -m moderator.cli demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
