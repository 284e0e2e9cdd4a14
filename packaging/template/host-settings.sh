#!/usr/bin/env bash
# Writes the package-client settings of THIS machine into directory $1, as build
# secrets for packaging/template/Containerfile (podman build --secret ...):
#
#   $1/buildenv   shell snippet exporting the settings, with every CA-bundle path
#                 pointing at the `hostca` secret and apt at the `aptconf` secret
#   $1/hostca     the CA bundle the machine's clients use (SSL_CERT_FILE & co.)
#   $1/aptconf    the machine's apt Acquire options (proxy, date checks)
#
# and prints the extra `podman build` arguments (one per line) that pass them, plus
# volumes for a local wheel directory (PIP_FIND_LINKS) and the pip and npm download
# caches, so the image build reuses what this machine already downloaded. Nothing here
# reaches the image: secrets and volumes exist only while a RUN step runs.
set -euo pipefail
out=$1
mkdir -p "$out"
: >"$out/buildenv"
args=()

ca=""
for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE PIP_CERT CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS; do
  if [ -n "${!v:-}" ] && [ -f "${!v}" ]; then ca=${!v}; break; fi
done
if [ -z "$ca" ] && command -v npm >/dev/null; then
  c=$(npm config get cafile 2>/dev/null || true)
  if [ -n "$c" ] && [ "$c" != null ] && [ -f "$c" ]; then ca=$c; fi
fi
if [ -n "$ca" ]; then
  cp "$ca" "$out/hostca"
  args+=(--secret "id=hostca,src=$out/hostca")
  for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE PIP_CERT CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS npm_config_cafile; do
    echo "export $v=/run/secrets/hostca" >>"$out/buildenv"
  done
fi

# Proxies and registry settings, passed through as they are.
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
         PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT \
         npm_config_registry NPM_CONFIG_REGISTRY; do
  if [ -n "${!v:-}" ]; then printf 'export %s=%q\n' "$v" "${!v}" >>"$out/buildenv"; fi
done

# A local wheel directory, mounted read-only at the same path.
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  args+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro")
  printf 'export PIP_FIND_LINKS=%q\n' "$PIP_FIND_LINKS" >>"$out/buildenv"
fi

# apt's network options (Acquire::*::Proxy, Check-Valid-Until, Check-Date...).
apt-config dump 2>/dev/null |
  grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::(Proxy|CaInfo|Verify-Peer|Verify-Host))' \
  >"$out/aptconf" || true
if [ -s "$out/aptconf" ]; then
  args+=(--secret "id=aptconf,src=$out/aptconf")
  echo 'export APT_CONFIG=/run/secrets/aptconf' >>"$out/buildenv"
fi

# Download caches shared with this machine's own pip and npm (filled earlier in the
# same CI run by the kernels' installer on the host).
pip_cache=${PIP_CACHE_DIR:-$HOME/.cache/pip}
npm_cache=$(npm config get cache 2>/dev/null || echo "$HOME/.npm")
mkdir -p "$pip_cache" "$npm_cache"
args+=(-v "$pip_cache:/run/guestd-build/pip-cache" -v "$npm_cache:/run/guestd-build/npm-cache")
{
  echo 'export PIP_CACHE_DIR=/run/guestd-build/pip-cache'
  echo 'export npm_config_cache=/run/guestd-build/npm-cache'
} >>"$out/buildenv"

args+=(--secret "id=buildenv,src=$out/buildenv")
printf '%s\n' "${args[@]}"
