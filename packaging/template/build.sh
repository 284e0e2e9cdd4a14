#!/usr/bin/env bash
# Builds the template image (packaging/template/Containerfile) with podman:
#
#   packaging/template/build.sh [IMAGE]          (default localhost/guestd-template:latest)
#
#   GUESTD_IMAGE_BASE      base image; default: a Debian 12 made locally by base.sh
#                          (set it to debian:12 where a registry is reachable)
#   GUESTD_KERNEL_PROFILE  kernels' package profile (default template)
#
# Needs the static binary first:
#   cargo build --profile ship --target x86_64-unknown-linux-musl --bin guestd
# This machine's package-client settings (CA bundle, proxies, apt options) and its
# pip/npm download caches reach the build as secrets and volumes (host-settings.sh),
# never as image content.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/packaging/template/containers.conf}
IMAGE=${1:-localhost/guestd-template:latest}
BASE=${GUESTD_IMAGE_BASE:-localhost/guestd-debian-base:12}
PROFILE=${GUESTD_KERNEL_PROFILE:-template}
BIN=target/x86_64-unknown-linux-musl/ship/guestd

if [ ! -x "$BIN" ]; then
  echo "missing $BIN: cargo build --profile ship --target x86_64-unknown-linux-musl --bin guestd" >&2
  exit 1
fi
if [ "$BASE" = localhost/guestd-debian-base:12 ]; then
  packaging/template/base.sh "$BASE"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t settings < <(packaging/template/host-settings.sh "$work/settings")

echo "[image] building $IMAGE from $BASE (kernel profile $PROFILE)" >&2
# --network host: RUN steps download packages through this machine's network; the
# container runs later get their own network namespace.
podman build --network host \
  -f packaging/template/Containerfile \
  --build-arg "BASE=$BASE" \
  --build-arg "GUESTD_KERNEL_PROFILE=$PROFILE" \
  "${settings[@]}" \
  -t "$IMAGE" .
