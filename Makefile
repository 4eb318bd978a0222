# The two commands README.md gives a new user: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-env.sh
	bash scripts/setup-env.sh $(VENV)
	touch $@

run: setup
	$(VENV)/bin/musar quickstart

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/routed_attention.py
	$(PY) benchmarks/condition_routing.py
	$(PY) benchmarks/training_throughput.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf outputs
