#!/usr/bin/env bash
# The template image built and tested in real containers (CI runs this from .ci/run):
#   1. podman, runc, mmdebstrap and slirp4netns from Debian (idempotent);
#   2. the static musl guestd (a no-op when CI built it already);
#   3. a Debian 12 base from Debian's packages and the template image
#      (packaging/template/build.sh, kernels with the `template` profile);
#   4. tests/container: the image's contents (no build-machine settings), guestd as
#      PID 1 (orphans reaped, `podman stop` within the grace period, restart), systemd
#      with the VM unit, the binary dropped into a plain image, the Kubernetes recipes;
#   5. the real-SDK suite (tests/python) against the container's published
#      49983/49999, with guestd as the entrypoint and then under systemd.
# Extra arguments go to both pytest runs of step 5 (e.g. -k pattern).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=$PWD/packaging/template/containers.conf
export GUESTD_IMAGE=${GUESTD_IMAGE:-localhost/guestd-template:latest}
VENV=tests/python/.venv
start=$SECONDS
log() { printf '[container %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

missing=()
for p in podman runc mmdebstrap slirp4netns; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

log "static guestd"
rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || true
cargo build --profile ship --target x86_64-unknown-linux-musl --bin guestd

log "test venv"
GUESTD_SKIP_KERNELS=1 packaging/dev/setup.sh
"$VENV/bin/pip" install -q -r tests/container/requirements.txt

log "image $GUESTD_IMAGE"
packaging/template/build.sh "$GUESTD_IMAGE"

log "container tests"
"$VENV/bin/python" -m pytest tests/container -q -p no:cacheprovider -rs

for mode in entrypoint systemd; do
  log "SDK suite against the container ($mode)"
  flock /tmp/e2b-ports.lock tests/container/sdk-suite.sh "$mode" "$@"
done
log "done"
