"""Shared fixtures: a guestd on the SDK's debug ports and a debug-mode Sandbox.

With E2B_DEBUG=true the SDKs talk to localhost:49983 (agent) and localhost:49999
(code interpreter) with no control plane. If something already serves 49983 (a guestd
started by hand), the suite uses it; otherwise it starts the binary named by
$GUESTD_BIN (default: target/release/guestd) and stops it at the end.

Against a container (tests/container/run.sh): $GUESTD_CONTAINER names the running
container whose published ports are 49983/49999 here. Whatever a test needs to do
where guestd runs (write the /init trust file, check a path, start a second guestd)
then goes through `podman exec` (see `Guest`):
  GUESTD_CONTAINER_TRUST_FILE   the --init-trust-file of the container's guestd
  GUESTD_CONTAINER_SPARE_PORT   a container port published to a free port here, for
                                the tests that start a second guestd
"""

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

os.environ["E2B_DEBUG"] = "true"

REPO = Path(__file__).resolve().parents[2]
AGENT_PORT = 49983
CODE_PORT = 49999
CONTAINER = os.environ.get("GUESTD_CONTAINER") or None
ENGINE = os.environ.get("GUESTD_CONTAINER_ENGINE", "podman")


class Guest:
    """The machine guestd runs on: this one, or the container named by $GUESTD_CONTAINER."""

    @staticmethod
    def run(argv, input=None, check=True):
        if CONTAINER:
            argv = [ENGINE, "exec", *(["-i"] if input is not None else []), CONTAINER, *argv]
        return subprocess.run(argv, input=input, capture_output=True, check=check)

    @staticmethod
    def exists(path: str) -> bool:
        return Guest.run(["test", "-e", path], check=False).returncode == 0


class GuestFile:
    """A file on the guest's side (the trust file of a containerised guestd)."""

    def __init__(self, path: str):
        self.path = path

    def write_text(self, text: str) -> None:
        Guest.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", self.path],
                  input=text.encode())

    def __str__(self):
        return self.path


def http_ok(port: int, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float, proc=None, log=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    text = log.read_text() if log and log.exists() else ""
    raise RuntimeError(f"guestd did not open port {port}; log:\n{text}")


class Guestd:
    """The guestd the suite talks to; `trust_file` is None when it was started by hand."""

    def __init__(self, proc, trust_file):
        self.proc = proc
        self.trust_file = trust_file


@pytest.fixture(scope="session", autouse=True)
def guestd(tmp_path_factory):
    if CONTAINER:
        # A published port accepts connections before the service inside does: ask
        # /health itself.
        deadline = time.time() + 60
        while not http_ok(AGENT_PORT):
            if time.time() > deadline:
                raise RuntimeError(f"container {CONTAINER} does not serve /health on {AGENT_PORT}")
            time.sleep(0.2)
        trust = os.environ.get("GUESTD_CONTAINER_TRUST_FILE")
        yield Guestd(None, GuestFile(trust) if trust else None)
        return
    if port_open(AGENT_PORT):
        yield Guestd(None, None)
        return
    binary = os.environ.get("GUESTD_BIN") or str(REPO / "target" / "release" / "guestd")
    workdir = tmp_path_factory.mktemp("guestd")
    log = workdir / "guestd.log"
    # The /init trust anchor (hex SHA-256 of the token the host expects), which the
    # control-plane tests rewrite; empty means none is published.
    trust_file = workdir / "init-trust"
    trust_file.write_text("")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--default-user", "user", "--init-trust-file", str(trust_file)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        wait_port(AGENT_PORT, 20, proc, log)
        yield Guestd(proc, trust_file)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def second_guestd(args, tmp_path):
    """Another guestd with `args` where guestd runs, listening on all addresses of a
    port it is given; yields the port to reach it at on 127.0.0.1 here. On this
    machine it is the binary of $GUESTD_BIN on a free port; in the container it is the
    image's guestd on $GUESTD_CONTAINER_SPARE_PORT (`inner:outer`, published)."""
    if CONTAINER:
        inner, outer = (int(p) for p in os.environ["GUESTD_CONTAINER_SPARE_PORT"].split(":"))
        tag = uuid.uuid4().hex[:8]
        pidfile, log = f"/tmp/second-guestd-{tag}.pid", f"/tmp/second-guestd-{tag}.log"
        script = 'echo $$ > "$1"; shift; log=$1; shift; exec guestd "$@" 2>"$log"'
        subprocess.run(
            [ENGINE, "exec", "-d", CONTAINER, "sh", "-c", script, "sh", pidfile, log,
             "--port", str(inner), *args],
            check=True,
        )
        try:
            deadline = time.time() + 20
            while not http_ok(outer):
                if time.time() > deadline:
                    text = Guest.run(["cat", log], check=False).stdout.decode(errors="replace")
                    raise RuntimeError(f"second guestd did not serve port {inner}; log:\n{text}")
                time.sleep(0.1)
            yield outer
        finally:
            Guest.run(["sh", "-c", 'kill -TERM "$(cat "$1")"', "sh", pidfile], check=False)
            deadline = time.time() + 10
            while http_ok(outer) and time.time() < deadline:
                time.sleep(0.1)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = os.environ.get("GUESTD_BIN") or str(REPO / "target" / "release" / "guestd")
    log = tmp_path / "guestd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1", "--port", str(port), *args],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        wait_port(port, 20, proc, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def sandbox():
    from e2b import Sandbox

    sbx = Sandbox.create()
    yield sbx



def pytest_runtest_setup(item):
    """Tests marked `template` need the template kernel profile. On a lean install they
    are deselected explicitly (tests/run.sh passes -m "not template"); selected without
    GUESTD_KERNEL_PROFILE=template they fail, never skip silently."""
    if item.get_closest_marker("template") and os.environ.get("GUESTD_KERNEL_PROFILE") != "template":
        pytest.fail(
            "needs the template kernel profile: install with GUESTD_KERNEL_PROFILE=template and "
            "run with GUESTD_KERNEL_PROFILE=template set (on a lean install: -m 'not template')",
            pytrace=False,
        )
