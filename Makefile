# Set-up and the two everyday jobs. `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull GBs of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $@

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/synthforge demo

test: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_dedup.py
	$(BIN)/python benchmarks/bench_vog.py
	$(BIN)/python benchmarks/bench_image_dedup.py
	$(BIN)/python benchmarks/bench_semantic_dedup.py
	$(BIN)/python benchmarks/bench_decontam.py
	$(BIN)/python benchmarks/bench_trace.py
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_image_scale.py --torch-threads 1
	$(BIN)/python benchmarks/low_data_digits.py

clean:
	rm -rf data models registry dvc.lock
