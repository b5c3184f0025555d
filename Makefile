# The two set-up commands of the README: `make demo` and `make test`.
# Both install what is missing first (Debian packages, the virtualenv).

VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: deps demo test bench lint clean

deps:
	@VENV=$(VENV) scripts/bootstrap.sh

demo: deps
	$(BIN)/python demo/demo.py

test: deps
	$(BIN)/pytest $(PYTEST_ARGS)

bench: deps
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/price_expressions.py

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
