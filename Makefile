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
	@# The GPU code (behind the `cuda` feature) must keep compiling on machines without a GPU.
	$(ENV) cargo check --workspace --all-targets --features cuda $(CARGO_FLAGS)
	@# NCCL loads (no GPU needed for that) under the name cudarc looks for: setup's symlink, the binaries' run path.
	$(ENV) cargo test -p lexflow-gpu --features cuda --lib $(CARGO_FLAGS) -- --test-threads=2 nccl::
	$(ENV) cargo test --workspace $(CARGO_FLAGS) -- --test-threads=2

bench: setup
	$(ENV) bash bench/run.sh

lint:
	$(ENV) cargo fmt --all --check && cargo clippy --workspace --all-targets -- -D warnings && \
		cargo clippy --workspace --all-targets --features cuda -- -D warnings
