#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, and the integration tests
# against a real PostgreSQL and real PgBouncers on loopback, and against a
# real Kubernetes control plane built from upstream modules (the services
# are described in scripts/test-env.sh; they are stopped at the end, pass
# or fail).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$REPO_ROOT/scripts/test-env.sh"
cd "$REPO_ROOT"

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "building"
cargo build --workspace --bins --quiet

trap test_env_down EXIT
test_env_up

say "cargo test"
cargo test --workspace -- ${TIDEPOOL_TEST_ARGS:-}
