"""The control-plane surface as a control plane and the pinned SDK see it: /init with
a token and env vars, then the SDK (holding the token, as after a real create) runs
commands that see the env vars, and one without the token is refused."""

import datetime
import hashlib
import json
import urllib.error
import urllib.request

import pytest
from e2b import AuthenticationException, Sandbox
from e2b.connection_config import ConnectionConfig
from packaging.version import Version

BASE = "http://localhost:49983"


def http(method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def sdk_with_token(token: str) -> Sandbox:
    """A Sandbox the way the SDK builds one after the control plane returned the agent's
    token (`envdAccessToken`): the token goes out as X-Access-Token on every call."""
    return Sandbox(
        sandbox_id="debug_sandbox_id",
        envd_version=Version("0.6.13"),
        envd_access_token=token,
        sandbox_domain=None,
        connection_config=ConnectionConfig(
            extra_sandbox_headers={"X-Access-Token": token, "E2b-Sandbox-Id": "debug_sandbox_id"}
        ),
    )


@pytest.fixture
def anchor(guestd):
    """Publishes host trust anchors for /init; clears the token again afterwards."""
    if guestd.trust_file is None:
        pytest.skip("needs the suite's own guestd (one was already running on :49983)")

    def publish(token: str):
        guestd.trust_file.write_text(hashlib.sha256(token.encode()).hexdigest())

    yield publish
    # The anchor of the empty string authorizes an /init that clears the token.
    publish("")
    status, _, _ = http("POST", "/init", {"envVars": {}})
    assert status == 204
    guestd.trust_file.write_text("")


def test_init_then_sdk_with_token(anchor):
    token = "0123456789abcdef" * 4
    anchor(token)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    body = {"accessToken": token, "envVars": {"GREETING": "hello from init"}, "defaultUser": "user", "timestamp": now}
    status, headers, _ = http("POST", "/init", body)
    assert status == 204
    assert headers.get("x-envd-version") == "0.6.13"
    # The host retries /init: the same request again is fine.
    status, _, _ = http("POST", "/init", body)
    assert status == 204

    sbx = sdk_with_token(token)
    r = sbx.commands.run("echo $GREETING; whoami")
    assert r.stdout == "hello from init\nuser\n"
    assert sbx.commands.run("echo $GREETING", envs={"GREETING": "per command"}).stdout == "per command\n"
    assert sbx.is_running()

    # Without the token (the plain debug-mode SDK sends none) the agent refuses.
    plain = Sandbox.create()
    with pytest.raises(AuthenticationException):
        plain.commands.run("true")
    # /health stays open for the SDK's liveness checks.
    assert plain.is_running()

    status, _, body = http("GET", "/envs", headers={"X-Access-Token": token})
    assert status == 200
    assert json.loads(body)["GREETING"] == "hello from init"


def test_prometheus_text_parses():
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = http("GET", "/metrics?format=prometheus")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ["guestd_cpu_used_percent", "guestd_memory_total_bytes", "guestd_processes", "guestd_connections"]:
        assert name in families, sorted(families)
        assert families[name].type == "gauge"
        assert len(families[name].samples) == 1
    assert families["guestd_process_resident_memory_bytes"].samples[0].value > 1e6
    assert families["guestd_reaped_orphans"].type == "counter"


def test_metrics_json_shape():
    status, _, body = http("GET", "/metrics")
    assert status == 200
    m = json.loads(body)
    assert set(m) == {"ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache",
                      "mem_total_mib", "mem_used_mib", "disk_total", "disk_used"}
    assert 0 <= m["cpu_used_pct"] <= 100
    assert m["mem_used"] <= m["mem_total"]
