"""`sandbox.pty` of the pinned real e2b SDK against guestd."""

import threading
import time

from e2b import PtySize


def test_pty_create_input_resize_kill(sandbox):
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=0)
    buf = bytearray()
    done = threading.Event()
    result = {}

    def on_pty(data: bytes):
        buf.extend(data)

    def run():
        try:
            result["r"] = h.wait(on_pty=on_pty)
        except Exception as e:  # killed: CommandExitException
            result["e"] = e
        done.set()

    threading.Thread(target=run, daemon=True).start()

    def wait_for(needle: bytes):
        deadline = time.time() + 15
        while needle not in buf:
            assert time.time() < deadline, f"no {needle!r} in {bytes(buf)!r}"
            time.sleep(0.05)

    sandbox.pty.send_stdin(h.pid, b"echo $TERM; stty size\n")
    wait_for(b"xterm-256color")
    wait_for(b"24 80")
    sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(h.pid, b"stty size\n")
    wait_for(b"40 120")
    assert any(p.pid == h.pid for p in sandbox.commands.list())
    assert sandbox.pty.kill(h.pid) is True
    assert done.wait(10)
    assert "e" in result and result["e"].exit_code == -1


def test_pty_exit_code_and_ctrl_d(sandbox):
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=0)
    out = bytearray()
    done = threading.Event()
    result = {}

    def run():
        try:
            result["r"] = h.wait(on_pty=out.extend)
        except Exception as e:
            result["e"] = e
        done.set()

    threading.Thread(target=run, daemon=True).start()
    sandbox.pty.send_stdin(h.pid, b"whoami\n")
    deadline = time.time() + 15
    while b"user\r\n" not in out:
        assert time.time() < deadline, bytes(out)
        time.sleep(0.05)
    time.sleep(0.2)  # let the shell print its next prompt and wait for input
    sandbox.pty.send_stdin(h.pid, b"\x04")  # Ctrl-D at an empty prompt ends the shell
    assert done.wait(10), bytes(out)
    assert result.get("r") is not None, result
    assert result["r"].exit_code == 0
