# The two commands a user needs: `make run` (the main job on the embedded sample config) and `make test` (every test).
SHELL := /bin/bash
ENV := source scripts/env.sh &&
CARGO_FLAGS ?=

.PHONY: setup build run test bench lint fmt
setup:
	@bash scripts/setup.sh

build: setup
	$(ENV) cargo build --workspace $(CARGO_FLAGS)

run: build
	$(ENV) "$$CARGO_TARGET_DIR/debug/lexflow" run $(CONFIG)

test: build
	$(ENV) cargo test --workspace $(CARGO_FLAGS) -- --test-threads=2

bench: setup
	$(ENV) bash bench/run.sh

lint:
	$(ENV) cargo fmt --all --check && cargo clippy --workspace -- -D warnings
