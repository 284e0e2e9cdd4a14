#!/usr/bin/env bash
# Runs guestd as PID 1 of fresh PID, mount and UTS namespaces: the closest stand-in for
# a sandbox VM on machines where no VM or container engine runs. guestd then reaps
# every orphan of the "sandbox" itself, as it must in a VM. The network namespace is
# shared, so the SDKs reach it on localhost:49983 / :49999 as usual.
#
#   packaging/local/run-in-namespace.sh [guestd flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${GUESTD_BIN:-target/release/guestd}
if [ ! -x "$BIN" ]; then
  cargo build --release --bin guestd
fi
exec unshare --pid --mount --uts --fork --mount-proc \
  /bin/sh -c 'hostname sandbox; exec "$0" --default-user user "$@"' "$(realpath "$BIN")" "$@"
