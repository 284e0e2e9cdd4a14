"""Fixtures of the container tests: podman (runc, through the project's
containers.conf), the template image under test, containers on free host ports, and the
real E2B SDK pointed at a container.

  GUESTD_IMAGE       the template image (default localhost/guestd-template:latest)
  GUESTD_BASE_IMAGE  a plain Debian 12 image (default localhost/guestd-debian-base:12)
  GUESTD_MUSL_BIN    the static binary (default target/x86_64-unknown-linux-musl/...)

tests/container/run.sh builds the images first.
"""

import json
import os
import resource
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GUESTD_IMAGE", "localhost/guestd-template:latest")
BASE_IMAGE = os.environ.get("GUESTD_BASE_IMAGE", "localhost/guestd-debian-base:12")
MUSL_BIN = Path(
    os.environ.get("GUESTD_MUSL_BIN")
    or REPO / "target" / "x86_64-unknown-linux-musl" / "ship" / "guestd"
)
os.environ.setdefault("CONTAINERS_CONF", str(REPO / "packaging" / "template" / "containers.conf"))
os.environ["E2B_DEBUG"] = "true"


def podman(*args, check=True, timeout=120, input=None):
    r = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def ulimit_args():
    """Explicit limits: podman's default (nofile 1048576) exceeds what an unprivileged
    host (no CAP_SYS_RESOURCE) may grant, and runc then refuses to start."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def http(port, path, method="GET", body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthy(port, path="/health"):
    try:
        status, _ = http(port, path, timeout=2)
        return 200 <= status < 300
    except OSError:
        return False


class Container:
    """One container of the image under test, its ports published on free host ports."""

    def __init__(self, name):
        self.name = name

    @classmethod
    def run(cls, image=IMAGE, args=(), entrypoint=None, ports=(49983, 49999), extra=()):
        name = f"guestd-test-{uuid.uuid4().hex[:10]}"
        cmd = ["run", "-d", "--name", name, "--network", "slirp4netns", *ulimit_args()]
        for p in ports:
            cmd += ["-p", f"127.0.0.1::{p}"]
        if entrypoint is not None:
            cmd += ["--entrypoint", entrypoint]
        podman(*cmd, *extra, image, *args)
        return cls(name)

    def port(self, inner):
        out = podman("port", self.name, f"{inner}/tcp").stdout.strip()
        return int(out.splitlines()[0].rsplit(":", 1)[1])

    def exec(self, *argv, check=True, timeout=60, input=None):
        return podman("exec", *(["-i"] if input is not None else []), self.name, *argv,
                      check=check, timeout=timeout, input=input)

    def inspect(self, fmt):
        return podman("inspect", "--format", fmt, self.name).stdout.strip()

    def state(self):
        return self.inspect("{{.State.Status}}")

    def logs(self):
        r = podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def wait_healthy(self, inner=49983, timeout=60, path="/health"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state() not in ("running", "created", "configured"):
                break
            if healthy(self.port(inner), path):
                return
            time.sleep(0.2)
        raise AssertionError(
            f"{self.name} does not serve {path} on {inner} (state {self.state()}); logs:\n{self.logs()}"
        )

    def sdk(self):
        """The real e2b SDK talking to this container's agent port."""
        from e2b import ConnectionConfig, Sandbox
        from e2b.envd.versions import ENVD_DEBUG_FALLBACK

        return Sandbox(
            sandbox_id=self.name,
            sandbox_domain=None,
            envd_version=ENVD_DEBUG_FALLBACK,
            envd_access_token=None,
            traffic_access_token=None,
            connection_config=ConnectionConfig(sandbox_url=f"http://127.0.0.1:{self.port(49983)}"),
        )

    def remove(self):
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def containers():
    """Makes containers and removes every one of them afterwards."""
    made = []

    def make(**kw):
        c = Container.run(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.remove()
