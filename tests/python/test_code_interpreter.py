"""The unmodified code-interpreter SDK (e2b-code-interpreter 2.11.5, debug mode) against
guestd's kernel bridge on localhost:49999.

The suite's guestd (conftest.py) serves it once its default kernel contexts are ready;
kernels come from packaging/kernels/install.sh. With GUESTD_REQUIRE_ALL_KERNELS set
(tests/run.sh sets it) a missing language kernel fails instead of skipping.
"""

import os
import time
import urllib.request

import pytest

os.environ["E2B_DEBUG"] = "true"

from e2b_code_interpreter import Sandbox  # noqa: E402
from e2b_code_interpreter.charts import ChartType  # noqa: E402
from e2b.exceptions import SandboxException, TimeoutException  # noqa: E402

from conftest import Guest  # noqa: E402

CODE_PORT = 49999


def healthy(port: int = CODE_PORT) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200 and r.read() == b'"OK"'
    except OSError:
        return False


def wait_healthy(timeout: float, proc=None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module", autouse=True)
def code_interpreter(guestd):
    # The code port opens once the default contexts (Python, JavaScript) are ready.
    if not wait_healthy(120):
        raise RuntimeError(f"guestd does not serve the code interpreter on {CODE_PORT}")
    yield


@pytest.fixture
def sandbox():
    return Sandbox.create()


def context_or_skip(sbx, language):
    try:
        return sbx.create_code_context(language=language)
    except SandboxException as e:
        if "no kernel is installed" in str(e):
            if os.environ.get("GUESTD_REQUIRE_ALL_KERNELS"):
                pytest.fail(f"no {language} kernel installed: {e}")
            pytest.skip(f"no {language} kernel installed")
        raise


def test_basic(sandbox):
    execution = sandbox.run_code("x = 1; x")
    assert execution.text == "1"
    assert execution.error is None


def test_statefulness(sandbox):
    ctx = sandbox.create_code_context()
    sandbox.run_code("test_stateful = 1", context=ctx)
    execution = sandbox.run_code("test_stateful += 1; test_stateful", context=ctx)
    assert execution.text == "2"
    assert execution.execution_count == 2


def test_callbacks(sandbox):
    stdout, stderr, results, errors = [], [], [], []
    code = (
        "import sys\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "from IPython.display import display\n"
        "display({'a': 1})\n"
        "raise ValueError('boom')\n"
    )
    execution = sandbox.run_code(
        code,
        on_stdout=stdout.append,
        on_stderr=stderr.append,
        on_result=results.append,
        on_error=errors.append,
    )
    assert [m.line for m in stdout] == ["to stdout\n"]
    assert [m.line for m in stderr] == ["to stderr\n"]
    assert stdout[0].error is False and stderr[0].error is True
    assert isinstance(stdout[0].timestamp, str) and stdout[0].timestamp.endswith("+00:00")
    assert len(results) == 1 and results[0].json == {"a": 1}
    assert len(errors) == 1 and errors[0].name == "ValueError" and errors[0].value == "boom"
    assert execution.error.name == "ValueError"
    assert execution.logs.stdout == ["to stdout\n"]


def test_streaming(sandbox):
    arrivals = []
    start = time.time()
    sandbox.run_code(
        "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
        on_stdout=lambda m: arrivals.append((m.line, time.time() - start)),
    )
    total = time.time() - start
    assert [a[0] for a in arrivals] == ["first\n", "second\n"]
    assert total - arrivals[0][1] > 1.5, f"the first line arrived at {arrivals[0][1]:.2f}s of {total:.2f}s"


def test_display_data_png(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.show()"
    )
    assert len(execution.results) == 1
    result = execution.results[0]
    assert result.png and result.is_main_result is False
    assert "png" in result.formats()


def test_dataframe_data(sandbox):
    execution = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})")
    result = execution.results[0]
    assert result.is_main_result
    assert result.data == {"a": [1, 2, 3], "b": ["x", "y", "z"]}
    assert result.html and "<table" in result.html
    assert execution.text is not None


@pytest.mark.parametrize(
    "plot, chart_type",
    [
        ("plt.bar(['a', 'b', 'c'], [1, 2, 3])", ChartType.BAR),
        ("plt.plot([1, 2, 3], [1, 4, 9], label='sq')", ChartType.LINE),
        ("plt.pie([1, 2, 3], labels=['a', 'b', 'c'])", ChartType.PIE),
        ("plt.scatter([1, 2, 3], [3, 1, 2])", ChartType.SCATTER),
    ],
)
def test_charts(sandbox, plot, chart_type):
    code = f"import matplotlib.pyplot as plt\nplt.figure()\n{plot}\nplt.title('My chart')\nplt.show()"
    execution = sandbox.run_code(code)
    assert execution.error is None, execution.error
    chart = execution.results[0].chart
    assert chart is not None
    assert chart.type == chart_type
    assert chart.title == "My chart"
    assert len(chart.elements) >= 1


# The chart cases as LLM-written code draws them, each checked down to its elements.
# Both kernel profiles pin matplotlib 3.10.x, where boxplot(labels=) still works.


def chart_of(sandbox, code):
    execution = sandbox.run_code("import matplotlib.pyplot as plt\nimport numpy as np\n" + code)
    assert execution.error is None, execution.error
    assert len(execution.results) == 1, execution.results
    assert execution.results[0].png
    chart = execution.results[0].chart
    assert chart is not None
    return chart


def test_chart_line_elements(sandbox):
    chart = chart_of(sandbox, (
        "x = np.linspace(0, 2, 5)\n"
        "plt.plot(x, x ** 2, label='square')\nplt.plot(x, x + 1, label='shift')\n"
        "plt.xlabel('Time (s)')\nplt.ylabel('Value')\nplt.title('Lines')\nplt.legend()\nplt.show()"
    ))
    assert chart.type == ChartType.LINE
    assert (chart.title, chart.x_label, chart.y_label, chart.x_unit) == ("Lines", "Time (s)", "Value", "s")
    assert [e.label for e in chart.elements] == ["square", "shift"]
    assert chart.elements[0].points[-1] == (2.0, 4.0)
    assert len(chart.elements[1].points) == 5


def test_chart_bar_elements(sandbox):
    chart = chart_of(sandbox, (
        "plt.bar(['Q1', 'Q2', 'Q3'], [10, 25, 15], label='2024')\n"
        "plt.xlabel('Quarter')\nplt.ylabel('Sales')\nplt.title('Sales')\nplt.show()"
    ))
    assert chart.type == ChartType.BAR
    assert (chart.title, chart.x_label, chart.y_label) == ("Sales", "Quarter", "Sales")
    assert [(e.label, e.value, e.group) for e in chart.elements] == [
        ("Q1", 10, "2024"), ("Q2", 25, "2024"), ("Q3", 15, "2024")
    ]


def test_chart_scatter_elements(sandbox):
    chart = chart_of(sandbox, (
        "plt.scatter([1, 2, 3], [4, 5, 6], label='A')\nplt.scatter([1, 2], [7, 8], label='B')\n"
        "plt.xlabel('x')\nplt.ylabel('y')\nplt.title('Points')\nplt.legend()\nplt.show()"
    ))
    assert chart.type == ChartType.SCATTER
    assert [e.label for e in chart.elements] == ["A", "B"]
    assert chart.elements[0].points == [(1, 4), (2, 5), (3, 6)]
    assert chart.elements[1].points == [(1, 7), (2, 8)]


def test_chart_pie_elements(sandbox):
    chart = chart_of(sandbox, (
        "plt.pie([1, 1, 2], labels=['a', 'b', 'c'])\nplt.title('Pie')\nplt.show()"
    ))
    assert chart.type == ChartType.PIE
    assert chart.title == "Pie"
    assert [(e.label, round(e.angle), e.radius) for e in chart.elements] == [
        ("a", 90, 1), ("b", 90, 1), ("c", 180, 1)
    ]


def test_chart_box_and_whiskers_with_labels(sandbox):
    # Axes.boxplot(labels=) is what LLM-written code uses; matplotlib 3.11 removed it.
    # (Boxes are recognised when drawn as patches, patch_artist=True, as in the reference.)
    chart = chart_of(sandbox, (
        "fig, ax = plt.subplots()\n"
        "ax.boxplot([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7, 8, 9, 30]], labels=['A', 'B'], patch_artist=True)\n"
        "ax.set_title('Boxes')\nax.set_xlabel('Group')\nax.set_ylabel('Score')\nplt.show()"
    ))
    assert chart.type == ChartType.BOX_AND_WHISKER
    assert (chart.title, chart.x_label, chart.y_label) == ("Boxes", "Group", "Score")
    a, b = chart.elements
    assert (a.label, a.min, a.first_quartile, a.median, a.third_quartile, a.max) == ("A", 1, 2, 3, 4, 5)
    assert (b.label, b.first_quartile, b.median, b.third_quartile, b.max, b.outliers) == ("B", 4, 6, 8, 9, [30])


def test_chart_with_numpy_integer_ticks(sandbox):
    # boxplot() without patches is recognised as lines; its ticks are numpy integers,
    # which the chart must survive (they once made the whole chart disappear).
    chart = chart_of(sandbox, "plt.boxplot([[1, 2, 3], [4, 5, 9]], labels=['a', 'b'])\nplt.title('t')\nplt.show()")
    assert chart.type == ChartType.LINE
    assert chart.x_ticks == [1, 2] and chart.x_tick_labels == ["a", "b"]


def test_chart_superchart_elements(sandbox):
    chart = chart_of(sandbox, (
        "fig, (a, b) = plt.subplots(1, 2)\nfig.suptitle('Both')\n"
        "a.plot([1, 2], [3, 4]); a.set_title('line')\n"
        "b.bar(['x', 'y'], [1, 2]); b.set_title('bars')\nplt.show()"
    ))
    assert chart.type == ChartType.SUPERCHART
    assert chart.title == "Both"
    assert [(c.type, c.title) for c in chart.elements] == [
        (ChartType.LINE, "line"), (ChartType.BAR, "bars")
    ]


def test_chart_unknown(sandbox):
    chart = chart_of(sandbox, (
        "fig, ax = plt.subplots()\nax.add_patch(plt.Circle((0.5, 0.5), 0.2))\n"
        "ax.set_title('Circle')\nplt.show()"
    ))
    assert chart.type == ChartType.UNKNOWN
    assert chart.title == "Circle"
    assert chart.elements == []


def test_contexts_create_list_restart_remove(sandbox):
    ctx = sandbox.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    listed = sandbox.list_code_contexts()
    assert listed[-1].id == ctx.id
    languages = {c.language for c in listed}
    assert "python" in languages
    if Guest.exists("/opt/guestd/python/share/jupyter/kernels/deno/kernel.json"):
        assert "javascript" in languages, "default JavaScript context"
    assert sandbox.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    sandbox.run_code("kept = 1", context=ctx)
    sandbox.restart_code_context(ctx)
    execution = sandbox.run_code("'kept' in globals(), __import__('os').getcwd()", context=ctx)
    assert execution.text == "(False, '/tmp')"
    assert execution.execution_count == 1
    sandbox.remove_code_context(ctx)
    assert ctx.id not in {c.id for c in sandbox.list_code_contexts()}


def test_env_vars_python(sandbox):
    assert sandbox.run_code("import os; os.getenv('FOO')", envs={"FOO": "bar"}).text == "bar"
    assert sandbox.run_code("import os; os.getenv('FOO')").text is None


def test_env_vars_bash(sandbox):
    execution = sandbox.run_code("echo $FOO", language="bash", envs={"FOO": "bar"})
    assert execution.logs.stdout and execution.logs.stdout[0] == "bar\n", execution
    assert sandbox.run_code("echo \"[$FOO]\"", language="bash").logs.stdout == ["[]\n"]


def test_env_vars_js(sandbox):
    execution = sandbox.run_code("process.env.FOO", language="js", envs={"FOO": "bar"})
    assert execution.text == "bar"


def test_env_vars_r(sandbox):
    context_or_skip(sandbox, "r")
    execution = sandbox.run_code("Sys.getenv('FOO')", language="r", envs={"FOO": "bar"})
    assert execution.results[0].text.strip() == '[1] "bar"'


def test_interrupt_by_timeout(sandbox):
    ctx = sandbox.create_code_context()
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\ntime.sleep(300)", context=ctx, timeout=3)
    time.sleep(5)
    start = time.time()
    execution = sandbox.run_code("1 + 1", context=ctx, timeout=10)
    assert execution.text == "2"
    assert time.time() - start < 10


def test_javascript(sandbox):
    execution = sandbox.run_code("console.log('Hello, World!')", language="js")
    assert execution.logs.stdout == ["Hello, World!\n"]
    execution = sandbox.run_code("import { readFileSync } from 'fs'\nconsole.log(typeof readFileSync)", language="javascript")
    assert execution.logs.stdout == ["function\n"]
    execution = sandbox.run_code("await Promise.resolve('Hello World!')", language="javascript")
    assert execution.text == "Hello World!"


def test_typescript(sandbox):
    execution = sandbox.run_code("const message: string = 'Hello, World!'; console.log(message)", language="ts")
    assert execution.logs.stdout == ["Hello, World!\n"]


def test_bash(sandbox):
    execution = sandbox.run_code("pwd", language="bash")
    assert execution.logs.stdout == ["/home/user\n"]


def test_r(sandbox):
    context_or_skip(sandbox, "r")
    execution = sandbox.run_code('print("Hello, World!")', language="r")
    assert execution.logs.stdout == ['[1] "Hello, World!"\n']


def test_java(sandbox):
    context_or_skip(sandbox, "java")
    execution = sandbox.run_code('System.getProperty("FOO")', language="java", envs={"FOO": "bar"})
    assert execution.text == "bar"
