"""guestd behind a router like kubernetes-sigs/agent-sandbox's: the router drops the
`Authorization` header (the SDK's way of naming the user of a call) and cuts every
non-upgrade stream after a fixed time (180 s there). `Router` below does both, with a
short cut, in front of the suite's guestd; the real SDK and raw Connect calls go
through it. What a client gets there (see README "Behind a router"):

* every call runs as the default user (`user`, or what /init named), whatever `user=`
  the SDK was given;
* a stream cut by the router ends with an error on the client; the process goes on,
  and a Connect call with guestd's `replay_from` resumes the output where the client
  left off, without a gap.
"""

import base64
import http.client
import json
import queue
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from e2b import ConnectionConfig, Sandbox
from e2b.envd.versions import ENVD_DEBUG_FALLBACK

from conftest import AGENT_PORT

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-connection", "host", "content-length"}


class Router:
    """An HTTP/1.1 reverse proxy to 127.0.0.1:AGENT_PORT that removes `Authorization`
    and closes any response still streaming `cut` seconds after its request."""

    def __init__(self, cut: float):
        self.cut = cut
        self.stripped = 0
        self.cuts = 0
        router = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.relay()

            def do_POST(self):
                self.relay()

            def read_body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            break
                        body += chunk
                    return body
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def relay(self):
                started = time.time()
                body = self.read_body()
                headers = {}
                for k, v in self.headers.items():
                    if k.lower() == "authorization":
                        router.stripped += 1
                        continue
                    if k.lower() not in HOP_BY_HOP:
                        headers[k] = v
                upstream = http.client.HTTPConnection("127.0.0.1", AGENT_PORT, timeout=60)
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunks = queue.Queue()

                def pump():
                    try:
                        while True:
                            data = resp.read1(65536)
                            chunks.put(data)
                            if not data:
                                return
                    except Exception:  # noqa: BLE001 - upstream closed under us (a cut)
                        chunks.put(b"")

                threading.Thread(target=pump, daemon=True).start()
                try:
                    while True:
                        left = router.cut - (time.time() - started)
                        try:
                            data = chunks.get(timeout=max(left, 0))
                        except queue.Empty:
                            # The router's stream timeout: the connection just ends.
                            router.cuts += 1
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if not data:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    upstream.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def router():
    r = Router(cut=2.0)
    yield r
    r.close()


def sdk_via(router):
    return Sandbox(
        sandbox_id="behind-router",
        sandbox_domain=None,
        envd_version=ENVD_DEBUG_FALLBACK,
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=ConnectionConfig(sandbox_url=f"http://127.0.0.1:{router.port}"),
    )


def test_without_authorization_every_call_runs_as_the_default_user(router):
    sbx = sdk_via(router)
    assert sbx.commands.run("whoami").stdout == "user\n"
    before = router.stripped
    # The SDK names root in `Authorization`; the router removes it.
    assert sbx.commands.run("whoami", user="root").stdout == "user\n"
    assert router.stripped > before, "the SDK sent Authorization and the router stripped it"
    info = sbx.files.write("router-test.txt", "via the router")
    assert info.path == "/home/user/router-test.txt"
    assert sbx.files.get_info("router-test.txt").owner == "user"
    sbx.files.remove("router-test.txt")


def envelope(msg: dict) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(data)) + data


def stream(port, method, msg, on_event, timeout=30):
    """One Connect server-stream call (JSON); calls on_event(msg) per message. Returns
    the end-of-stream JSON, or None when the connection ended without one (cut)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", f"/process.Process/{method}", body=envelope(msg),
                 headers={"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    buf = b""
    try:
        while True:
            try:
                chunk = resp.read1(65536)
            except (http.client.IncompleteRead, ConnectionError, OSError):
                return None
            if not chunk:
                return None
            buf += chunk
            while len(buf) >= 5:
                flags, size = struct.unpack(">BI", buf[:5])
                if len(buf) < 5 + size:
                    break
                body, buf = json.loads(buf[5:5 + size]), buf[5 + size:]
                if flags & 2:
                    return body
                on_event(body)
    finally:
        conn.close()


def test_a_cut_stream_resumes_with_replay(router):
    script = "for i in $(seq 1 30); do echo line-$i; sleep 0.15; done"
    expected = "".join(f"line-{i}\n" for i in range(1, 31))
    got = bytearray()
    pid = {}

    def collect(msg):
        event = msg.get("event", {})
        if "start" in event:
            pid["pid"] = event["start"]["pid"]
        data = event.get("data", {})
        for key in ("stdout", "stderr"):
            if key in data:
                got.extend(base64.b64decode(data[key]))

    end = stream(router.port, "Start",
                 {"process": {"cmd": "/bin/bash", "args": ["-c", script]}}, collect)
    # The router cut the stream (2 s) before the command (4.5 s) was done.
    assert end is None and router.cuts >= 1
    assert 0 < len(got) < len(expected), got
    assert expected.startswith(got.decode())

    # Reconnect through the router, asking guestd to replay from what we already have.
    received = len(got)
    offsets = []

    def resume(msg):
        event = msg.get("event", {})
        if "start" in event:
            offsets.append(int(event["start"].get("replayOffset", -1)))
        collect(msg)

    deadline = time.time() + 20
    while time.time() < deadline:
        end = stream(router.port, "Connect",
                     {"process": {"pid": pid["pid"]}, "replayFrom": str(len(got))}, resume)
        if end is not None:
            break
    assert offsets[0] == received, "replay began exactly where the client left off"
    assert got.decode() == expected, "no gap and no duplicate"
