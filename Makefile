# The two commands README.md gives a new user: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	bash scripts/setup-env.sh $(VENV)
	touch $@

run: setup
	$(VENV)/bin/musar demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/routed_attention.py

clean:
	rm -rf outputs
