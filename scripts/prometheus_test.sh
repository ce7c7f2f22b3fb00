#!/usr/bin/env bash
# The dashboard against a real Prometheus: installs Prometheus when missing (apt, as root; otherwise fails), builds the
# `lexflow` binary, then runs tests/prometheus_dashboard.rs (harness test + a real `lexflow run` of configs/sample.toml
# scraped every second; fails listing every dashboard expression that returned no data). Never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "prometheus_test: installing Prometheus with apt" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
    # The package may start a service on :9090: left alone, the test runs its own instance on a free loopback port.
  else
    echo "prometheus_test: Prometheus is not installed and this is not root: run 'sudo apt-get install -y prometheus'" >&2
    exit 1
  fi
fi
prometheus --version 2>&1 | head -1 || /usr/bin/prometheus --version 2>&1 | head -1

# The test runs <target>/debug/lexflow; cargo test cannot build it (it holds the target lock while tests run).
cargo build -p lexflow-actors --bin lexflow
export LEXFLOW_BIN="$CARGO_TARGET_DIR/debug/lexflow"
cargo test -p lexflow-tests --test prometheus_dashboard -- --test-threads=1 "$@"
