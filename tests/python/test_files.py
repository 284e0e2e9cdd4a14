"""`sandbox.files` (and signed file URLs) of the pinned real e2b SDK against guestd."""

import asyncio
import hashlib
import io
import os
import time
import uuid

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    ConnectionConfig,
    FileNotFoundException,
    FileType,
    FilesystemEventType,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
)
from e2b.envd.versions import ENVD_DEBUG_FALLBACK
from e2b.sandbox.filesystem.filesystem import WriteEntry

from conftest import second_guestd

HOME = "/home/user"


@pytest.fixture
def workdir(sandbox):
    """A fresh directory under the default user's home, removed afterwards."""
    path = f"{HOME}/files-test-{uuid.uuid4().hex[:10]}"
    assert sandbox.files.make_dir(path)
    yield path
    sandbox.files.remove(path)


def wait_for(poll, predicate, timeout=10.0):
    """Polls `poll()` (returning a list) until an item satisfies `predicate`."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen.extend(poll())
        if any(predicate(e) for e in seen):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not seen within {timeout}s: {seen}")


def test_write_and_read_text_bytes_stream(sandbox, workdir):
    info = sandbox.files.write(f"{workdir}/hello.txt", "hello, world\n")
    assert info.path == f"{workdir}/hello.txt"
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(f"{workdir}/hello.txt") == "hello, world\n"
    assert sandbox.files.read(f"{workdir}/hello.txt", format="bytes") == bytearray(b"hello, world\n")
    with sandbox.files.read(f"{workdir}/hello.txt", format="stream") as stream:
        assert b"".join(stream) == b"hello, world\n"
    # gzip download explicitly requested.
    assert sandbox.files.read(f"{workdir}/hello.txt", gzip=True) == "hello, world\n"
    # An empty file.
    sandbox.files.write(f"{workdir}/empty", "")
    assert sandbox.files.read(f"{workdir}/empty") == ""


def test_relative_paths_land_in_the_users_home(sandbox):
    name = f"rel-{uuid.uuid4().hex[:8]}.txt"
    info = sandbox.files.write(name, "relative")
    assert info.path == f"{HOME}/{name}"
    assert sandbox.files.read(f"{HOME}/{name}") == "relative"
    assert sandbox.files.get_info(name).owner == "user"
    sandbox.files.remove(name)


def test_streamed_and_gzip_uploads_round_trip(sandbox, workdir):
    data = os.urandom(5 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()
    # A file-like object: streamed octet-stream upload.
    sandbox.files.write(f"{workdir}/big.bin", io.BytesIO(data))
    got = sandbox.files.read(f"{workdir}/big.bin", format="bytes")
    assert hashlib.sha256(bytes(got)).hexdigest() == digest
    # An iterable of chunks, gzip-compressed on the way.
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    sandbox.files.write(f"{workdir}/big2.bin", chunks, gzip=True)
    with sandbox.files.read(f"{workdir}/big2.bin", format="stream") as stream:
        h = hashlib.sha256()
        for chunk in stream:
            h.update(chunk)
    assert h.hexdigest() == digest
    # Bytes through multipart, forced.
    sandbox.files.write(f"{workdir}/big3.bin", data, use_octet_stream=False)
    assert hashlib.sha256(bytes(sandbox.files.read(f"{workdir}/big3.bin", format="bytes"))).hexdigest() == digest


def test_write_files_in_one_request(sandbox, workdir):
    infos = sandbox.files.write_files(
        [
            WriteEntry(path=f"{workdir}/a.txt", data="A"),
            WriteEntry(path=f"{workdir}/nested/dir/b.txt", data=b"B"),
            WriteEntry(path=f"{workdir}/c.txt", data="C"),
        ]
    )
    assert [i.path for i in infos] == [
        f"{workdir}/a.txt",
        f"{workdir}/nested/dir/b.txt",
        f"{workdir}/c.txt",
    ]
    assert sandbox.files.read(f"{workdir}/nested/dir/b.txt") == "B"
    assert sandbox.files.get_info(f"{workdir}/nested").permissions == "drwxr-xr-x"


def test_list_exists_get_info(sandbox, workdir):
    sandbox.files.write(f"{workdir}/b.txt", "bb")
    sandbox.files.write(f"{workdir}/A.txt", "a")
    sandbox.files.make_dir(f"{workdir}/dir/sub")
    sandbox.files.write(f"{workdir}/dir/sub/deep.txt", "deep")
    sandbox.commands.run(f"ln -s {workdir}/b.txt {workdir}/link")

    names = [e.name for e in sandbox.files.list(workdir)]
    assert names == ["A.txt", "b.txt", "dir", "link"]
    deep = [e.path for e in sandbox.files.list(workdir, depth=3)]
    assert deep == [
        f"{workdir}/A.txt",
        f"{workdir}/b.txt",
        f"{workdir}/dir",
        f"{workdir}/dir/sub",
        f"{workdir}/dir/sub/deep.txt",
        f"{workdir}/link",
    ]
    by_name = {e.name: e for e in sandbox.files.list(workdir)}
    assert by_name["dir"].type == FileType.DIR
    assert by_name["link"].type == FileType.SYMLINK
    assert by_name["link"].symlink_target == f"{workdir}/b.txt"

    assert sandbox.files.exists(f"{workdir}/b.txt")
    assert not sandbox.files.exists(f"{workdir}/nope")
    info = sandbox.files.get_info(f"{workdir}/b.txt")
    assert info.type == FileType.FILE
    assert info.size == 2
    assert info.mode == 0o644
    assert info.permissions == "-rw-r--r--"
    assert info.owner == "user" and info.group == "user"
    assert abs(info.modified_time.timestamp() - time.time()) < 120
    d = sandbox.files.get_info(f"{workdir}/dir")
    assert d.type == FileType.DIR and d.mode == 0o755 and d.permissions == "drwxr-xr-x"


def test_make_dir_rename_remove(sandbox, workdir):
    assert sandbox.files.make_dir(f"{workdir}/x/y")
    assert not sandbox.files.make_dir(f"{workdir}/x/y"), "already exists"
    sandbox.files.write(f"{workdir}/x/y/f.txt", "f")
    moved = sandbox.files.rename(f"{workdir}/x/y/f.txt", f"{workdir}/moved/g.txt")
    assert moved.path == f"{workdir}/moved/g.txt" and moved.name == "g.txt"
    assert not sandbox.files.exists(f"{workdir}/x/y/f.txt")
    assert sandbox.files.read(f"{workdir}/moved/g.txt") == "f"
    sandbox.files.remove(f"{workdir}/x")
    assert not sandbox.files.exists(f"{workdir}/x")
    sandbox.files.remove(f"{workdir}/x")  # missing: fine


def test_errors_map_to_sdk_exceptions(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/missing.txt", f"{workdir}/x.txt")
    with pytest.raises(InvalidArgumentException, match="is a directory"):
        sandbox.files.read(workdir)
    sandbox.files.write(f"{workdir}/file", "x")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.list(f"{workdir}/file")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(workdir, "x")
    with pytest.raises(AuthenticationException):
        sandbox.files.write(f"{workdir}/u.txt", "x", user="no-such-user-x")
    with pytest.raises(AuthenticationException):
        sandbox.files.list(workdir, user="no-such-user-x")


def test_metadata(sandbox, workdir):
    info = sandbox.files.write(f"{workdir}/m.txt", "x", metadata={"Owner": "alice", "kind": "report"})
    assert info.metadata == {"owner": "alice", "kind": "report"}
    assert sandbox.files.get_info(f"{workdir}/m.txt").metadata == {"owner": "alice", "kind": "report"}
    listed = {e.name: e for e in sandbox.files.list(workdir)}
    assert listed["m.txt"].metadata == {"owner": "alice", "kind": "report"}
    # A new upload replaces the set.
    sandbox.files.write(f"{workdir}/m.txt", "y")
    assert sandbox.files.get_info(f"{workdir}/m.txt").metadata is None
    # Server-side limits (the SDK accepts the key, guestd refuses it).
    with pytest.raises(InvalidArgumentException, match="invalid metadata"):
        sandbox.files.write(f"{workdir}/m.txt", "z", metadata={"k" * 247: "v"})
    assert sandbox.files.read(f"{workdir}/m.txt") == "y"


def test_watch_dir_sync_polling(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    handle = sandbox.files.watch_dir(workdir, recursive=True, include_entry=True)
    try:
        sandbox.files.write(f"{workdir}/top.txt", "1")
        events = wait_for(
            handle.get_new_events,
            lambda e: e.name == "top.txt" and e.type == FilesystemEventType.WRITE,
        )
        create = next(e for e in events if e.name == "top.txt" and e.type == FilesystemEventType.CREATE)
        assert create.entry is not None and create.entry.path == f"{workdir}/top.txt"
        assert all(e.name == "top.txt" for e in events), f"no temp names: {events}"
        sandbox.files.write(f"{workdir}/sub/inner.txt", "2")
        wait_for(
            handle.get_new_events,
            lambda e: e.name == "sub/inner.txt" and e.type == FilesystemEventType.WRITE,
        )
        sandbox.files.remove(f"{workdir}/top.txt")
        wait_for(
            handle.get_new_events,
            lambda e: e.name == "top.txt" and e.type == FilesystemEventType.REMOVE,
        )
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_watch_dir_async_streaming(workdir):
    async def main():
        sbx = await AsyncSandbox.create()
        events = []
        got = asyncio.Event()

        def on_event(e):
            events.append(e)
            if e.name == "sub/async.txt" and e.type == FilesystemEventType.WRITE:
                got.set()

        await sbx.files.make_dir(f"{workdir}/sub")
        handle = await sbx.files.watch_dir(workdir, on_event=on_event, recursive=True)
        try:
            await sbx.files.write(f"{workdir}/sub/async.txt", "hi")
            await asyncio.wait_for(got.wait(), 10)
        finally:
            await handle.stop()
        assert any(e.name == "sub/async.txt" and e.type == FilesystemEventType.CREATE for e in events), events

        with pytest.raises(FileNotFoundException):
            await sbx.files.watch_dir(f"{workdir}/missing", on_event=on_event)

    asyncio.run(main())


def test_upload_and_download_urls_without_a_token(sandbox, workdir):
    url = sandbox.upload_url(f"{workdir}/via-url.txt")
    assert "signature" not in url
    r = httpx.post(url, files={"file": ("via-url.txt", b"through the url")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == f"{workdir}/via-url.txt"
    r = httpx.get(sandbox.download_url(f"{workdir}/via-url.txt"))
    assert r.status_code == 200 and r.content == b"through the url"


@pytest.fixture
def secured(tmp_path):
    """A second guestd (where guestd runs) with an access token set through /init, and
    a Sandbox object that holds the token (as one from the control plane would)."""
    args = ["--default-user", "user", "--no-code-interpreter", "--no-port-forward"]
    with second_guestd(args, tmp_path) as port:
        token = uuid.uuid4().hex
        r = httpx.post(f"http://127.0.0.1:{port}/init", json={"accessToken": token})
        assert r.status_code == 204, r.text
        config = ConnectionConfig(
            sandbox_url=f"http://127.0.0.1:{port}",
            extra_sandbox_headers={"X-Access-Token": token},
        )
        sbx = Sandbox(
            sandbox_id="secured",
            sandbox_domain=None,
            envd_version=ENVD_DEBUG_FALLBACK,
            envd_access_token=token,
            traffic_access_token=None,
            connection_config=config,
        )
        yield sbx, port


def test_signed_urls(secured):
    sbx, port = secured
    path = f"{HOME}/signed-{uuid.uuid4().hex[:8]} a+b.txt"
    # The SDK's own calls carry the token header.
    sbx.files.write(path, "signed content")
    assert sbx.files.read(path) == "signed content"

    # Without the header or a signature: refused.
    plain = f"http://127.0.0.1:{port}/files"
    r = httpx.get(plain, params={"path": path})
    assert r.status_code == 401
    assert r.json()["message"] == "missing signature query parameter"

    url = sbx.download_url(path)
    assert "signature=v1_" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"signed content"
    r = httpx.get(url.replace("signature=v1_", "signature=v1_x"))
    assert r.status_code == 401 and r.json()["message"] == "invalid signature"

    r = httpx.get(sbx.download_url(path, use_signature_expiration=60))
    assert r.status_code == 200
    r = httpx.get(sbx.download_url(path, use_signature_expiration=-10))
    assert r.status_code == 401
    assert r.json() == {"code": 401, "message": "signature is already expired"}

    up = sbx.upload_url(path, user="user")
    r = httpx.post(up, files={"file": ("x", b"uploaded via signed url")})
    assert r.status_code == 200, r.text
    assert sbx.files.read(path) == "uploaded via signed url"
    # A read signature does not allow writing.
    r = httpx.post(sbx.download_url(path), files={"file": ("x", b"nope")})
    assert r.status_code == 401
    sbx.files.remove(path)
