# Two commands for a newcomer: `make run` (the main job) and `make test` (the tests); `make lint` for ruff.
# Each builds .venv with everything it needs the first time, then reuses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run lint test trial bench clean

install: $(VENV)/.installed

# torch and torchvision first, at the versions this machine serves from its own disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(PY) study/run.py --study default

# ruff with pyproject.toml's rules, over the whole repository.
lint: install
	$(PY) -m ruff check .

# Debian's chromium opens the HTML report and the MLflow UI for the browser tests (apt needs root; else they
# skip); Playwright drives it.
test: install
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium not installed: the report screenshot test will skip"
	$(PY) -m pytest -q

trial: install
	$(PY) -m trainables

bench: install
	$(PY) bench/iteration_time.py --n-dis 1 --iters 3 --warmup 1

clean:
	rm -rf $(VENV)
