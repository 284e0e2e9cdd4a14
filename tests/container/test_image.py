"""What the template image holds, and what it must not hold: none of the build
machine's package-client settings (CA bundle, proxies, apt options), which reach the
build only as secrets (packaging/template/host-settings.sh)."""

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import IMAGE, REPO, podman, ulimit_args

HOST_SETTING_VARS = [
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS", "npm_config_cafile", "PIP_FIND_LINKS", "PIP_INDEX_URL",
    "PIP_CACHE_DIR", "npm_config_cache", "APT_CONFIG", "http_proxy", "https_proxy",
    "HTTP_PROXY", "HTTPS_PROXY",
]


def in_image(script, *args):
    """Runs a shell script (with `args` as $1...) in a throwaway container of the image."""
    return podman("run", "--rm", "--network", "none", *ulimit_args(), "--entrypoint", "/bin/sh",
                  IMAGE, "-c", script, "sh", *args, timeout=300).stdout


def pem_certs(text):
    """The DER bytes of every certificate in a PEM bundle."""
    certs, cur = [], None
    for line in text.splitlines():
        line = line.strip()
        if line == "-----BEGIN CERTIFICATE-----":
            cur = []
        elif line == "-----END CERTIFICATE-----" and cur is not None:
            certs.append(base64.b64decode("".join(cur)))
            cur = None
        elif cur is not None:
            cur.append(line)
    return certs


def test_the_config_carries_no_build_settings():
    cfg = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    leaked = sorted(set(env) & set(HOST_SETTING_VARS))
    assert leaked == [], env
    assert cfg["Entrypoint"] == ["/usr/local/bin/guestd"]
    # Nor does the build history: only secret paths, never the values.
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    for v in HOST_SETTING_VARS:
        value = os.environ.get(v)
        if value and len(value) > 3:
            assert value not in history, f"{v}={value} is in the image history"


def test_no_host_files_or_client_settings_in_the_image():
    out = in_image(
        "for f in /run/secrets/* /etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf "
        "/root/.pip/pip.conf /etc/npmrc /usr/etc/npmrc /root/.npmrc /home/user/.npmrc; do "
        "  [ -e \"$f\" ] && echo \"present: $f\"; done; "
        "grep -rlE 'Check-Valid-Until|Check-Date|Proxy' /etc/apt/apt.conf.d /etc/apt/apt.conf 2>/dev/null "
        "| sed 's/^/apt: /'; "
        "ls -A /root/.cache/pip /root/.npm 2>/dev/null | sed 's/^/cache: /'; true"
    )
    assert out == "", out


def test_the_build_machines_own_ca_certificates_are_not_in_the_image():
    """Certificates the build machine trusts beyond the public set its ca-certificates
    package ships (an intercepting proxy's CA, say) were given to the build as a
    secret; no file of the image may hold them."""
    host_bundle = None
    for v in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"]:
        if os.environ.get(v) and Path(os.environ[v]).is_file():
            host_bundle = Path(os.environ[v])
            break
    if host_bundle is None:
        host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    public = set()
    for f in Path("/usr/share/ca-certificates").rglob("*.crt"):
        public.update(pem_certs(f.read_text(errors="replace")))
    local = [c for c in pem_certs(host_bundle.read_text(errors="replace")) if c not in public]
    if not local:
        pytest.skip(f"{host_bundle} holds only the public certificates of ca-certificates: nothing could leak")
    # PEM wraps base64 at 64 characters, so each full line is a literal substring of any
    # PEM copy; the last full line lies in the signature, unique to the certificate.
    needles = []
    for der in local:
        b64 = base64.b64encode(der).decode()
        k = len(b64) // 64 - 1
        needles.append(b64[64 * k:64 * (k + 1)])
    found = in_image(
        "printf '%s\\n' \"$@\" > /tmp/needles; "
        "grep -rlF -f /tmp/needles / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
        "--exclude-dir=tmp 2>/dev/null; true",
        *needles,
    )
    assert found == "", f"the build machine's own CA certificates are in the image: {found}"


def test_the_image_runs_the_static_binary_with_envds_version_flags():
    v = podman("run", "--rm", "--network", "none", *ulimit_args(), IMAGE, "-version").stdout
    assert v == "0.6.13\n"
    assert podman("run", "--rm", "--network", "none", *ulimit_args(), IMAGE, "--version").stdout == v
    # No program interpreter: nothing to load from the image's libc.
    interp = in_image("head -c 4096 /usr/local/bin/guestd | grep -c ld-linux; true").strip()
    assert interp == "0"


def test_user_with_passwordless_sudo():
    out = in_image("id user; su user -c 'sudo -n true && echo sudo-ok'")
    assert "uid=1000(user)" in out and "sudo-ok" in out
