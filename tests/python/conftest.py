"""Shared fixtures: a guestd on the SDK's debug ports and a debug-mode Sandbox.

With E2B_DEBUG=true the SDKs talk to localhost:49983 (agent) and localhost:49999
(code interpreter) with no control plane. If something already serves 49983 (a guestd
started by hand), the suite uses it; otherwise it starts the binary named by
$GUESTD_BIN (default: target/release/guestd) and stops it at the end.
"""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ["E2B_DEBUG"] = "true"

REPO = Path(__file__).resolve().parents[2]
AGENT_PORT = 49983
CODE_PORT = 49999


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
