#!/usr/bin/env bash
# Makes a Debian 12 base image from Debian's own packages, for machines that cannot pull
# `debian:12` from a registry: mmdebstrap (minbase, like the official image) into a
# tarball, then `podman import`. The image holds nothing of this machine: the apt
# options the download needs here (packaging/template/host-settings.sh) are given to
# mmdebstrap only and removed from the tree before it is packed.
#
#   packaging/template/base.sh [IMAGE]     (default localhost/guestd-debian-base:12)
#
# Does nothing when IMAGE already exists (GUESTD_BASE_REBUILD=1 forces a new one).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/packaging/template/containers.conf}
IMAGE=${1:-localhost/guestd-debian-base:12}
MIRROR=${GUESTD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${GUESTD_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [ "${GUESTD_BASE_REBUILD:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "[base] $IMAGE exists" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
packaging/template/host-settings.sh "$work/settings" >/dev/null
aptopt=()
if [ -s "$work/settings/aptconf" ]; then aptopt=(--aptopt="$work/settings/aptconf"); fi

echo "[base] mmdebstrap bookworm (minbase) -> $IMAGE" >&2
mmdebstrap --variant=minbase --quiet "${aptopt[@]}" \
  --customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap" "$1/etc/resolv.conf" "$1/etc/hostname"' \
  bookworm "$work/rootfs.tar" \
  "deb $MIRROR bookworm main" \
  "deb $MIRROR bookworm-updates main" \
  "deb $SECURITY bookworm-security main"
podman import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$IMAGE" >/dev/null
echo "[base] imported $IMAGE" >&2
