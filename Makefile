# The two entry points from the README.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	. $(VENV)/bin/activate && dvc repro

test: install
	$(PY) -m pytest -q

.PHONY: install demo test
