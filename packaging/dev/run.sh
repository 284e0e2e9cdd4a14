#!/usr/bin/env bash
# Builds guestd and starts it in the foreground on both ports (49983 agent API,
# 49999 kernel bridge), as the sandbox template would. Extra arguments go to guestd.
set -euo pipefail
cd "$(dirname "$0")/../.."
packaging/dev/setup.sh
cargo build --release --bin guestd
exec target/release/guestd --default-user user "$@"
