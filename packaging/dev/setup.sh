#!/usr/bin/env bash
# Prepares this machine to run guestd like an E2B-style sandbox template, idempotently:
#   - the `user` account (home /home/user, bash, passwordless sudo) the SDKs expect;
#   - the Python virtualenv with the pinned E2B SDKs for the test suite;
#   - the Jupyter kernels of the kernel bridge (packaging/kernels/install.sh), unless
#     GUESTD_SKIP_KERNELS=1.
# Needs root and Debian's apt (for sudo). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it creates users and installs packages)" >&2
  exit 1
fi

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

apt_install sudo procps

if ! id user >/dev/null 2>&1; then
  log "creating user 'user'"
  useradd --create-home --home-dir /home/user --shell /bin/bash user
fi
if [ ! -f /etc/sudoers.d/90-guestd-user ]; then
  echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/90-guestd-user
  chmod 0440 /etc/sudoers.d/90-guestd-user
fi

VENV=tests/python/.venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
if ! cmp -s tests/python/requirements.txt "$VENV/.installed-requirements" 2>/dev/null; then
  log "installing the pinned test requirements"
  "$VENV/bin/pip" install -q -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$VENV/.installed-requirements"
fi

if [ "${GUESTD_SKIP_KERNELS:-0}" != 1 ] && [ -x packaging/kernels/install.sh ]; then
  packaging/kernels/install.sh
fi
log "ready"
