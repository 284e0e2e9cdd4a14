#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (the built binary over its real
# ports, Connect JSON/proto and gRPC clients) and the Python suite with the pinned
# real E2B SDKs. Installs what it needs first (packaging/dev/setup.sh, which installs the
# kernels of GUESTD_KERNEL_PROFILE, default lean). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packaging/dev/setup.sh
cargo build --release --bin guestd
GUESTD_REQUIRE_ALL_KERNELS=1 cargo test --release
# Tests marked `template` need the template kernel profile's packages: they run when
# GUESTD_KERNEL_PROFILE=template (the template image); the lean install deselects them.
if [ "${GUESTD_KERNEL_PROFILE:-lean}" = template ]; then
  markers=()
else
  markers=(-m "not template")
fi
GUESTD_REQUIRE_ALL_KERNELS=1 GUESTD_BIN="$PWD/target/release/guestd" tests/python/.venv/bin/python -m pytest tests/python -q -p no:cacheprovider "${markers[@]}" "$@"
