# Two commands do everything on a fresh machine: `make train` and `make test`.
SHELL := /bin/bash
PY312 ?= $(shell command -v python3.12 || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
PY311 ?= $(shell command -v python3.11 || ls -d $$HOME/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | head -1)
VENV := .venv
HFVENV := .venv-hf
WORKDIR ?= runs/default
# Test processes: the suite is mostly single-threaded XLA compilation, so 2 workers on 2 cores
# take ~19 min instead of ~27 (one file per worker: module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: train test venv hfvenv clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x "$(PY312)" || { echo "Python 3.12 not found (jax >= 0.11 needs it)"; exit 1; }
	test -d $(VENV) || $(PY312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# torch + transformers for the HF parity reference; CPU torch exists here only for 3.11.
$(HFVENV)/.installed: requirements-hf.txt
	test -x "$(PY311)" || { echo "Python 3.11 not found (needed for the HF reference env)"; exit 1; }
	test -d $(HFVENV) || $(PY311) -m venv $(HFVENV)
	$(HFVENV)/bin/pip install -q --disable-pip-version-check -r requirements-hf.txt
	touch $@

venv: $(VENV)/.installed
hfvenv: $(HFVENV)/.installed

train: venv
	$(VENV)/bin/python train.py --gin_file configs/default.gin --workdir $(WORKDIR)

test: venv hfvenv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) $(HFVENV)
