"""The template image run the two ways engines run it: guestd as the container's
entrypoint (PID 1, agent-sandbox's flags) and under systemd from
packaging/systemd/guestd.service (the VM way); plus the binary dropped into a plain
Debian image (the OpenKruise pattern). Driven with podman and the real e2b SDK."""

import re
import time
from pathlib import Path

import yaml

from conftest import BASE_IMAGE, MUSL_BIN, REPO, healthy, http

MANIFEST = REPO / "packaging" / "kubernetes" / "sandbox.yaml"


def agent_sandbox_args():
    """The flags packaging/kubernetes/sandbox.yaml gives guestd (agent-sandbox's envd ones)."""
    sandbox = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Sandbox")
    return sandbox["spec"]["podTemplate"]["spec"]["containers"][0]["args"]


def zombies(c):
    out = c.exec("ps", "-eo", "stat=,pid=,ppid=,comm=").stdout
    return [line for line in out.splitlines() if line.strip().startswith("Z")]


def reaped_orphans(port):
    status, body = http(port, "/metrics?format=prometheus")
    assert status == 200
    m = re.search(r"^guestd_reaped_orphans_total (\d+)", body.decode(), re.M)
    assert m, body
    return int(m.group(1))


def test_entrypoint_with_agent_sandboxs_flags(containers):
    args = agent_sandbox_args()
    assert args == ["--isnotfc", "--no-cgroups", "--port", "49983", "--verbose"]
    c = containers(args=args)
    c.wait_healthy(49983)
    c.wait_healthy(49999, timeout=120)
    assert c.exec("cat", "/proc/1/cmdline").stdout.split("\0")[0] == "/usr/local/bin/guestd"
    sbx = c.sdk()
    r = sbx.commands.run("echo $E2B_SANDBOX; whoami; pwd")
    # --isnotfc: not in a Firecracker VM; the image's `user` is the default user.
    assert r.stdout == "false\nuser\n/home/user\n"
    assert sbx.commands.run("sudo -n id -u").stdout == "0\n"


def test_pid1_reaps_every_orphan(containers):
    c = containers(args=["--isnotfc"], ports=(49983,), extra=["--env", "GUESTD_LOG=info"])
    c.wait_healthy(49983)
    port = c.port(49983)
    before = reaped_orphans(port)
    sbx = c.sdk()
    # Orphans of a command guestd started: each subshell exits at once, its `sleep`
    # is re-parented to PID 1.
    sbx.commands.run("for i in $(seq 20); do (sleep 0.2 &); done; true")
    # Orphans of processes guestd never started (an exec from outside): re-parented to
    # PID 1 of the container too.
    c.exec("sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.2 &); done")
    deadline = time.time() + 10
    while time.time() < deadline and (zombies(c) or c.exec("pgrep", "-x", "sleep", check=False).stdout):
        time.sleep(0.2)
    assert zombies(c) == [], c.exec("ps", "-ef").stdout
    assert c.exec("pgrep", "-x", "sleep", check=False).stdout == ""
    # The metrics sampler runs every 5 s.
    deadline = time.time() + 12
    while reaped_orphans(port) < before + 25 and time.time() < deadline:
        time.sleep(0.5)
    assert reaped_orphans(port) >= before + 25


def test_podman_stop_ends_guestd_cleanly_within_its_grace(containers):
    c = containers(args=["--isnotfc"])
    c.wait_healthy(49983)
    c.wait_healthy(49999, timeout=120)
    sbx = c.sdk()
    # Something to stop: a background command and the running kernels.
    sbx.commands.run("sleep 1000", background=True)
    grace = 10
    t0 = time.time()
    from conftest import podman

    podman("stop", "-t", str(grace), c.name, timeout=60)
    elapsed = time.time() - t0
    logs = c.logs()
    # SIGTERM ended guestd itself (exit 0, its log says so): podman did not have to
    # SIGKILL it when the grace period ran out (exit code 137).
    assert c.inspect("{{.State.ExitCode}}") == "0", logs
    assert elapsed < grace - 2, f"stop took {elapsed:.1f}s of a {grace}s grace period:\n{logs}"
    assert "shutting down" in logs


def test_a_restarted_container_serves_again(containers):
    c = containers(args=["--isnotfc"], ports=(49983,))
    c.wait_healthy(49983)
    c.sdk().files.write("/home/user/kept.txt", "written before the restart")
    from conftest import podman

    podman("restart", "-t", "10", c.name, timeout=60)
    c.wait_healthy(49983)
    sbx = c.sdk()  # ports may change on restart: ask podman again
    assert sbx.files.read("/home/user/kept.txt") == "written before the restart"
    assert sbx.commands.run("echo back").stdout == "back\n"


def test_dropped_into_a_plain_debian_image(containers, tmp_path):
    """OpenKruise's way (packaging/kubernetes/sandbox-init-container.yaml): the static
    binary copied into a volume of an image that knows nothing of guestd (no `user`
    account), started by a postStart-like exec with `-isnotfc`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "guestd").write_bytes(MUSL_BIN.read_bytes())
    (bindir / "guestd").chmod(0o755)
    c = containers(
        image=BASE_IMAGE,
        args=["sleep", "infinity"],
        entrypoint="",
        ports=(49983,),
        extra=["-v", f"{bindir}:/opt/guestd-bin:ro"],
    )
    c.exec("/bin/sh", "-c", "/opt/guestd-bin/guestd -isnotfc >/tmp/guestd.log 2>&1 &")
    c.wait_healthy(49983)
    # The image has no `user`: the default falls back to root, as envd's default is.
    assert c.sdk().commands.run("whoami; echo $HOME").stdout == "root\n/root\n"
    log = c.exec("cat", "/tmp/guestd.log").stdout
    assert "default user 'user' does not exist; using 'root' until /init names another" in log
    # /init can still name a user the image does have.
    status, _ = http(c.port(49983), "/init", "POST", {"defaultUser": "daemon"})
    assert status == 204
    assert c.sdk().commands.run("whoami").stdout == "daemon\n"


SYSTEMD_DROPIN = """[Service]
Environment=GUESTD_INIT_TRUST_FILE=/var/lib/guestd-test/init-trust
"""


def systemd_container(containers, tmp_path, ports=(49983, 49999)):
    dropin = tmp_path / "test.conf"
    dropin.write_text(SYSTEMD_DROPIN)
    return containers(
        entrypoint="/sbin/init",
        ports=ports,
        extra=[
            "--systemd=always",
            # systemd halts on SIGRTMIN+3 (it ignores SIGTERM as PID 1).
            "--stop-signal", "SIGRTMIN+3",
            # Nice=-20 and IOSchedulingClass=realtime of the unit need CAP_SYS_NICE, which
            # root in a VM has and podman's default set does not.
            "--cap-add", "SYS_NICE",
            "-v", f"{dropin}:/etc/systemd/system/guestd.service.d/test.conf:ro",
        ],
    )


def unit_property(c, prop):
    return c.exec("systemctl", "show", "guestd.service", "-p", prop, "--value").stdout.strip()


def test_systemd_runs_guestd_with_the_references_protections(containers, tmp_path):
    c = systemd_container(containers, tmp_path, ports=(49983,))
    c.wait_healthy(49983, timeout=90)
    assert c.exec("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert unit_property(c, "ActiveState") == "active"
    expected = {
        "Restart": "always",
        "OOMScoreAdjust": "-1000",
        "OOMPolicy": "continue",
        "Nice": "-20",
        "IOSchedulingClass": "1",  # realtime
        "CPUWeight": "1000",
        "IOWeight": "10000",
        "MemoryMin": str(50 * 1024 * 1024),
        "MemoryLow": str(100 * 1024 * 1024),
        "Delegate": "yes",
        "StartLimitIntervalUSec": "0",
    }
    got = {p: unit_property(c, p) for p in expected}
    assert got == expected
    pid = unit_property(c, "MainPID")
    # What the kernel applied to the running guestd.
    assert c.exec("ps", "-o", "ni=", "-p", pid).stdout.strip() == "-20"
    # Restart=always: a killed guestd is back within a second or two.
    c.exec("kill", "-9", pid)
    deadline = time.time() + 10
    while time.time() < deadline:
        new = unit_property(c, "MainPID")
        if new not in ("0", pid) and healthy(c.port(49983)):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(c.exec("journalctl", "-u", "guestd", "--no-pager", check=False).stdout)
    assert c.sdk().commands.run("whoami").stdout == "user\n"


def test_systemd_container_stops_cleanly_and_restarts(containers, tmp_path):
    c = systemd_container(containers, tmp_path, ports=(49983,))
    c.wait_healthy(49983, timeout=90)
    from conftest import podman

    grace = 20
    t0 = time.time()
    podman("stop", "-t", str(grace), c.name, timeout=90)
    elapsed = time.time() - t0
    assert elapsed < grace - 2, f"systemd shutdown took {elapsed:.1f}s:\n{c.logs()}"
    podman("start", c.name)
    c.wait_healthy(49983, timeout=90)
    assert c.sdk().commands.run("echo again").stdout == "again\n"
