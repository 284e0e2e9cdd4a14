#!/usr/bin/env bash
# The project's real-SDK suite (tests/python: commands, files, PTY, code interpreter in
# every language, control plane) against the template image in a container whose ports
# 49983/49999 are published on localhost, as the SDKs in debug mode expect. Run it under
# `flock /tmp/e2b-ports.lock` (tests/container/run.sh does).
#
#   tests/container/sdk-suite.sh entrypoint|systemd [pytest args...]
#
# entrypoint: guestd is PID 1 with agent-sandbox's flags (packaging/kubernetes/sandbox.yaml);
# systemd:    systemd is PID 1 and starts packaging/systemd/guestd.service (the VM way).
# The suite must pass with no test skipped: a skip here would hide a missing kernel or a
# test that cannot reach the container.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/packaging/template/containers.conf}
MODE=$1
shift
IMAGE=${GUESTD_IMAGE:-localhost/guestd-template:latest}
NAME=guestd-sdk-$MODE-$$
TRUST=/var/lib/guestd-test/init-trust
VENV=tests/python/.venv
work=$(mktemp -d)
cleanup() {
  if [ "${GUESTD_KEEP_CONTAINER:-0}" != 1 ]; then podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

hard() { local v; v=$(ulimit -H "$1"); if [ "$v" = unlimited ]; then echo "$2"; else echo $(( v < $2 ? v : $2 )); fi; }
nofile=$(hard -n 1048576)
nproc=$(hard -u "$(cat /proc/sys/kernel/pid_max)")
run=(podman run -d --name "$NAME" --network slirp4netns
     --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
     -p 127.0.0.1:49983:49983 -p 127.0.0.1:49999:49999 -p 127.0.0.1::49990)
# User code in the suite installs packages from the registries (pip, Deno's npm:
# imports). Where this machine reaches them only through a CA of its own (an
# intercepting proxy), the container gets this machine's CA bundle as its system bundle
# for the run, read-only, as a sandbox gets its network's CA from the control plane;
# the image itself keeps Debian's (tests/container/test_image.py).
settings=$work/settings
packaging/template/host-settings.sh "$settings" >/dev/null
if [ -f "$settings/hostca" ]; then
  run+=(-v "$settings/hostca:/etc/ssl/certs/ca-certificates.crt:ro")
fi
case $MODE in
  entrypoint)
    mapfile -t args < <("$VENV/bin/python" -c '
import yaml, sys
d = next(d for d in yaml.safe_load_all(open("packaging/kubernetes/sandbox.yaml")) if d["kind"] == "Sandbox")
print("\n".join(d["spec"]["podTemplate"]["spec"]["containers"][0]["args"]))')
    "${run[@]}" -e "GUESTD_INIT_TRUST_FILE=$TRUST" "$IMAGE" "${args[@]}" >/dev/null
    ;;
  systemd)
    printf '[Service]\nEnvironment=GUESTD_INIT_TRUST_FILE=%s\n' "$TRUST" >"$work/test.conf"
    "${run[@]}" --entrypoint /sbin/init --systemd=always --stop-signal SIGRTMIN+3 --cap-add SYS_NICE \
      -v "$work/test.conf:/etc/systemd/system/guestd.service.d/test.conf:ro" "$IMAGE" >/dev/null
    ;;
  *) echo "usage: $0 entrypoint|systemd" >&2; exit 2 ;;
esac
spare=$(podman port "$NAME" 49990/tcp | head -1 | sed 's/.*://')

"$VENV/bin/python" - <<'PY' || { podman logs "$NAME" 2>&1 | tail -50; exit 1; }
import time, urllib.request
for port in (49983, 49999):
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status < 300:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit(f"no /health on {port}")
        time.sleep(0.2)
PY

status=0
GUESTD_CONTAINER=$NAME GUESTD_CONTAINER_TRUST_FILE=$TRUST GUESTD_CONTAINER_SPARE_PORT=49990:$spare \
GUESTD_REQUIRE_ALL_KERNELS=1 GUESTD_KERNEL_PROFILE=template \
  "$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider -rs \
  --junitxml="$work/junit.xml" "$@" || status=$?
if [ $status -ne 0 ]; then
  echo "--- guestd's log ($MODE) ---" >&2
  if [ "$MODE" = systemd ]; then
    podman exec "$NAME" journalctl -u guestd --no-pager 2>&1 | tail -80 >&2 || true
  else
    podman logs "$NAME" 2>&1 | tail -80 >&2 || true
  fi
  exit $status
fi
"$VENV/bin/python" - "$work/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
if tests == 0 or skipped:
    raise SystemExit(f"container SDK suite: {tests} tests, {skipped} skipped; every test must run here")
PY
