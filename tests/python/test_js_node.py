"""What LLM-written JavaScript expects from Node, on guestd's Deno kernel (README, "JavaScript
and TypeScript"), through the unmodified code-interpreter SDK. Each behaviour the README
lists as working or as different is pinned here."""

import os

import pytest

os.environ["E2B_DEBUG"] = "true"

from e2b_code_interpreter import Sandbox  # noqa: E402

from test_code_interpreter import code_interpreter  # noqa: E402,F401 (module fixture)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox.create()


@pytest.fixture(scope="module")
def js(sandbox):
    return sandbox.create_code_context(language="js")


def test_commonjs_require_of_builtins_and_local_files(sandbox, js):
    sandbox.files.write("/home/user/guestd_cjs_mod.js", "module.exports = { twice: (x) => 2 * x };\n")
    execution = sandbox.run_code(
        "const path = require('path');\nconst m = require('./guestd_cjs_mod.js');\n"
        "path.basename('/a/b.txt') + ':' + m.twice(21)",
        context=js,
    )
    assert execution.error is None, execution.error
    assert execution.text == "b.txt:42"


def test_process_env_and_argv(sandbox, js):
    execution = sandbox.run_code(
        "process.env.GUESTD_JS_FOO + ':' + typeof process.argv + ':' + process.platform",
        context=js,
        envs={"GUESTD_JS_FOO": "bar"},
    )
    assert execution.text == "bar:object:linux"


def test_fs_sync_and_promises(sandbox, js):
    execution = sandbox.run_code(
        "import fs from 'fs'\nimport { readFile } from 'fs/promises'\n"
        "fs.writeFileSync('/tmp/guestd-js.txt', 'hello')\n"
        "await readFile('/tmp/guestd-js.txt', 'utf8')",
        context=js,
    )
    assert execution.error is None, execution.error
    assert execution.text == "hello"


def test_top_level_await_value_is_the_result(sandbox, js):
    execution = sandbox.run_code(
        "const wait = (ms) => new Promise((r) => setTimeout(r, ms));\nawait wait(10);\n[1, 2, 3].map((x) => x * 2)",
        context=js,
    )
    assert execution.text == "[ 2, 4, 6 ]"


def test_last_expression_display_uses_node_style_inspect(sandbox, js):
    execution = sandbox.run_code("({ a: 1, b: [1, 2], s: 'x' })", context=js)
    assert execution.text == "{ a: 1, b: [ 1, 2 ], s: \"x\" }"
    # A string result loses its quotes (the SDK contract's quote stripping).
    assert sandbox.run_code("'plain'", context=js).text == "plain"
    # A statement as the last line gives no result.
    assert sandbox.run_code("const z = 5;", context=js).results == []


def test_console_table_prints_a_table_in_deno_layout(sandbox, js):
    execution = sandbox.run_code("console.table([{ a: 1, b: 'x' }, { a: 2, b: 'y' }])", context=js)
    out = "".join(execution.logs.stdout)
    lines = out.splitlines()
    # Deno's layout: an "(idx)" column (Node says "(index)"), box-drawing borders.
    assert lines[0].startswith("┌") and "(idx)" in lines[1], out
    assert [c.strip() for c in lines[1].strip("│").split("│")] == ["(idx)", "a", "b"]
    assert [c.strip() for c in lines[3].strip("│").split("│")] == ["0", "1", '"x"']


def test_require_of_a_computed_name_and_cjs_globals(sandbox, js):
    execution = sandbox.run_code("const name = 'guestd-never-loaded-pkg';\nrequire(name)", context=js)
    assert execution.error is not None
    assert "Cannot find module" in execution.error.value, execution.error
    execution = sandbox.run_code("[typeof module, typeof exports, typeof __dirname].join(',')", context=js)
    assert execution.text == "undefined,undefined,undefined"
