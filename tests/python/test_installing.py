"""Installing packages the way people type it, through the unmodified SDKs (e2b 2.63.0,
e2b-code-interpreter 2.11.5, debug mode), against the real registries.

Python: `!pip install X`, `%pip install X` and `commands.run("pip install X")` (as the
default user) each make X importable in the next cell of a running kernel, without a
restart. Each test first uninstalls its package (as root: a previous run may have left
it) and checks that the import fails, so a pass means this run installed it.

JavaScript/TypeScript: bare npm imports and require() resolve from the npm registry on
first use; kernel errors (a TypeScript syntax error) arrive with Deno's own message.
"""

import os

import pytest

os.environ["E2B_DEBUG"] = "true"

from e2b import Sandbox as AgentSandbox  # noqa: E402
from e2b_code_interpreter import Sandbox  # noqa: E402

from test_code_interpreter import code_interpreter  # noqa: E402,F401 (module fixture)


@pytest.fixture
def sandbox():
    return Sandbox.create()


def uninstall_and_check_missing(sbx, ctx, package, module):
    kernel_python = sbx.run_code("import sys; sys.executable", context=ctx).text
    r = AgentSandbox.create().commands.run(
        f"{kernel_python} -m pip uninstall -y -q {package}", user="root", timeout=120
    )
    assert r.exit_code == 0, r.stderr
    missing = sbx.run_code(f"import {module}", context=ctx)
    assert missing.error is not None and missing.error.name == "ModuleNotFoundError", missing


def test_bang_pip_install_then_import(sandbox):
    ctx = sandbox.create_code_context()
    uninstall_and_check_missing(sandbox, ctx, "tabulate", "tabulate")
    install = sandbox.run_code("!pip install -q --disable-pip-version-check tabulate==0.9.0", context=ctx, timeout=180)
    assert install.error is None, install
    assert not any("externally-managed" in line for line in install.logs.stderr + install.logs.stdout), install.logs
    used = sandbox.run_code("import tabulate\nprint(tabulate.tabulate([[1, 2]], headers=['a', 'b']))", context=ctx)
    assert used.error is None, used.error
    assert "".join(used.logs.stdout).split("\n")[0].split() == ["a", "b"], used.logs
    # The kernel (root) installed it; the default user can still remove it.
    r = AgentSandbox.create().commands.run("pip uninstall -y tabulate", timeout=120)
    assert r.exit_code == 0, r.stderr


def test_percent_pip_install_then_import(sandbox):
    ctx = sandbox.create_code_context()
    uninstall_and_check_missing(sandbox, ctx, "termcolor", "termcolor")
    install = sandbox.run_code("%pip install -q --disable-pip-version-check termcolor==2.5.0", context=ctx, timeout=180)
    assert install.error is None, install
    used = sandbox.run_code("from termcolor import colored\ncolored('hi', 'red')", context=ctx)
    assert used.error is None, used.error
    assert used.text == r"\x1b[31mhi\x1b[0m", repr(used.text)  # the repr of the string


def test_command_pip_install_as_default_user_then_import(sandbox):
    ctx = sandbox.create_code_context()
    uninstall_and_check_missing(sandbox, ctx, "humanize", "humanize")
    agent = AgentSandbox.create()
    which = agent.commands.run("whoami; command -v pip python3")
    assert which.stdout.split("\n")[0] == "user"
    # The kernels' venv comes first on the default user's PATH (login shell).
    kernel_python = sandbox.run_code("import sys; sys.executable", context=ctx).text
    assert which.stdout.split("\n")[2] == os.path.join(os.path.dirname(kernel_python), "python3"), which.stdout
    r = agent.commands.run("pip install -q --disable-pip-version-check humanize==4.12.3", timeout=180)
    assert r.exit_code == 0, r.stderr
    used = sandbox.run_code("import humanize\nhumanize.intcomma(1234567)", context=ctx)
    assert used.error is None, used.error
    assert used.text == "1,234,567"
    # The same package from a plain python3 command as the default user.
    cmd = agent.commands.run("python3 -c 'import humanize; print(humanize.intcomma(1000))'")
    assert cmd.stdout == "1,000\n"


def test_js_bare_import_resolves_from_npm(sandbox):
    # The example: a documented TypeScript snippet with a bare import.
    execution = sandbox.run_code(
        'import axios from "axios";\n'
        'const r = await axios.get("https://registry.npmjs.org/left-pad/1.3.0");\n'
        "r.data.name + '@' + r.data.version",
        language="typescript",
        timeout=180,
    )
    assert execution.error is None, execution.error
    assert execution.text == "left-pad@1.3.0"


def test_js_require_resolves_from_npm(sandbox):
    execution = sandbox.run_code(
        'const _ = require("lodash");\nJSON.stringify(_.chunk([1, 2, 3, 4, 5], 2))',
        language="js",
        timeout=180,
    )
    assert execution.error is None, execution.error
    assert execution.text == "[[1,2],[3,4],[5]]"
    # CommonJS built-ins too.
    execution = sandbox.run_code('const fs = require("fs"); fs.existsSync("/home/user")', language="js")
    assert execution.text == "true"


def test_ts_syntax_error_has_the_parser_message(sandbox):
    execution = sandbox.run_code("const x: number = ;", language="ts")
    assert execution.error is not None
    assert execution.error.value != "Execution failed"
    assert "Expression expected" in execution.error.value, execution.error
    assert "<cell>:1:19" in execution.error.value
    assert execution.error.traceback, execution.error
