"""`sandbox.commands` of the pinned real e2b SDK against guestd."""

import time

import pytest
from e2b import CommandExitException


def test_run_stdout_stderr_exit_code(sandbox):
    r = sandbox.commands.run("echo out; echo err >&2")
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    assert r.exit_code == 0
    assert r.error is None


def test_non_zero_exit_raises_with_details(sandbox):
    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("echo partial; echo bad >&2; exit 7")
    assert e.value.exit_code == 7
    assert e.value.stdout == "partial\n"
    assert e.value.stderr == "bad\n"
    assert e.value.error == "exit status 7"


def test_broken_utf8_does_not_break_the_stream(sandbox):
    r = sandbox.commands.run(r"printf 'a\xffb\xc3'; printf '\xa9 ok\n'")
    # \xc3 then \xa9 across writes is a valid é; \xff is replaced.
    assert r.stdout.endswith("é ok\n")
    assert r.stdout.startswith("a")
    assert "b" in r.stdout


def test_long_output_arrives_complete(sandbox):
    r = sandbox.commands.run("seq 1 200000")
    lines = r.stdout.splitlines()
    assert len(lines) == 200000
    assert lines[0] == "1" and lines[-1] == "200000"


def test_callbacks_stream_output(sandbox):
    chunks = []
    r = sandbox.commands.run("for i in 1 2 3; do echo line$i; sleep 0.1; done", on_stdout=chunks.append)
    assert "".join(chunks) == r.stdout == "line1\nline2\nline3\n"
    assert len(chunks) >= 2, "output streamed in several events"


def test_env_vars_per_command(sandbox):
    r = sandbox.commands.run('echo "$FOO|$BAR"', envs={"FOO": "foo value", "BAR": "b=1"})
    assert r.stdout == "foo value|b=1\n"


def test_cwd(sandbox):
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"


def test_runs_as_user_by_default_and_as_root_on_request(sandbox):
    assert sandbox.commands.run("whoami").stdout == "user\n"
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    assert sandbox.commands.run("echo $HOME", user="root").stdout == "/root\n"
    # the template's user has passwordless sudo
    assert sandbox.commands.run("sudo -n whoami").stdout == "root\n"


def test_background_connect_list_kill(sandbox):
    h = sandbox.commands.run("echo started; sleep 30", background=True)
    pids = [p.pid for p in sandbox.commands.list()]
    assert h.pid in pids
    info = next(p for p in sandbox.commands.list() if p.pid == h.pid)
    assert info.cmd == "/bin/bash"
    assert info.args[-1] == "echo started; sleep 30"
    other = sandbox.commands.connect(h.pid)
    assert sandbox.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as e:
        other.wait()
    assert e.value.exit_code == -1
    assert e.value.error == "signal: killed"
    assert sandbox.commands.kill(999999) is False
    deadline = time.time() + 5
    while h.pid in [p.pid for p in sandbox.commands.list()]:
        assert time.time() < deadline
        time.sleep(0.05)


def test_send_stdin_and_close_stdin(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello\n")
    sandbox.commands.send_stdin(h.pid, b"bytes\n")
    sandbox.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "hello\nbytes\n"
    assert r.exit_code == 0


def test_stream_input(sandbox):
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, iter(["a", "b", b"c\n"]))
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout == "abc\n"


def test_stdin_is_closed_by_default(sandbox):
    # Without stdin=True, a command reading stdin sees EOF instead of hanging.
    assert sandbox.commands.run("cat; echo eof", timeout=10).stdout == "eof\n"


def test_timeout_kills_the_command(sandbox):
    from e2b import TimeoutException

    t0 = time.time()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=1)
    assert time.time() - t0 < 10
    # guestd's deadline (the same Connect-Timeout-Ms) kills the process.
    deadline = time.time() + 5
    while any(p.args[-1] == "sleep 30" for p in sandbox.commands.list()):
        assert time.time() < deadline, "the timed-out command is still running"
        time.sleep(0.05)


def test_missing_cwd_is_an_invalid_argument(sandbox):
    from e2b import InvalidArgumentException

    with pytest.raises(InvalidArgumentException) as e:
        sandbox.commands.run("true", cwd="/no/such/dir")
    assert "cwd '/no/such/dir' does not exist" in str(e.value)


def test_unknown_user_is_an_authentication_error(sandbox):
    from e2b import AuthenticationException

    with pytest.raises(AuthenticationException) as e:
        sandbox.commands.run("true", user="no-such-user")
    assert "invalid username: 'no-such-user'" in str(e.value)
