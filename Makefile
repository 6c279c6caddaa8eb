# Two commands for a newcomer: `make run` (the main job) and `make test` (the tests).
# Each builds .venv with everything it needs the first time, then reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, at the versions this machine serves from its own disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(PY) study/run.py --study default

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/iteration_time.py

clean:
	rm -rf $(VENV)
