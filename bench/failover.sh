#!/bin/sh
# Builds pgha and pgha-bench (release) and runs the failover benchmark.
# Arguments go to `pgha-bench failover`, e.g.:
#   bench/failover.sh --trials 5 --json-out /tmp/failover.json
#   bench/failover.sh --scenarios node-loss --ttl 2s --loop-wait 250ms --retry-timeout 600ms
# Needs root (PostgreSQL runs as OS user postgres), etcd and PostgreSQL 15
# (scripts/install-deps.sh). The JSON report goes to stdout, progress to
# stderr; see bench/README.md.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins >&2
# The report records which source the agents were built from.
PGHA_BENCH_REVISION="$(git describe --always --dirty 2>/dev/null || echo unknown)"
export PGHA_BENCH_REVISION
exec "${CARGO_TARGET_DIR:-target}/release/pgha-bench" failover "$@"
