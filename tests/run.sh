#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (the built binary over its real
# ports, Connect JSON/proto and gRPC clients) and the Python suite with the pinned
# real E2B SDKs. Installs what it needs first (packaging/dev/setup.sh). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packaging/dev/setup.sh
cargo build --release --bin guestd
GUESTD_REQUIRE_ALL_KERNELS=1 cargo test --release
GUESTD_REQUIRE_ALL_KERNELS=1 GUESTD_BIN="$PWD/target/release/guestd" tests/python/.venv/bin/python -m pytest tests/python -q -p no:cacheprovider "$@"
