"""The template profile's package set (packaging/kernels/requirements-template.txt)
through the unmodified code-interpreter SDK: every package imports in the default
Python context and does one typical thing, and the installed versions are the pinned
ones.

Marker `template`: these run where the kernels were installed with
GUESTD_KERNEL_PROFILE=template (the template image) and GUESTD_KERNEL_PROFILE=template
is set for the run; tests/run.sh deselects them explicitly (`-m "not template"`) on the
lean host install, and conftest.py fails them if selected without that variable.
"""

import os
import re
from pathlib import Path

import pytest

os.environ["E2B_DEBUG"] = "true"

from e2b_code_interpreter import Sandbox  # noqa: E402

from test_code_interpreter import code_interpreter  # noqa: E402,F401 (module fixture)

pytestmark = pytest.mark.template

REQUIREMENTS = Path(__file__).resolve().parents[2] / "packaging" / "kernels"


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox.create()


def pins():
    """name -> version of every pin in the template profile (with the lean file)."""
    out = {}
    for name in ("requirements.txt", "requirements-template.txt"):
        for line in (REQUIREMENTS / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def test_installed_versions_are_the_pins(sandbox):
    wanted = pins()
    assert len(wanted) >= 35, wanted
    execution = sandbox.run_code(
        "import importlib.metadata as m\n"
        f"{{n: m.version(n) for n in {sorted(wanted)!r}}}"
    )
    assert execution.error is None, execution.error
    assert execution.results[0].json == wanted


# (package, code, expected main-result text); the local HTTP target is guestd's own
# code-interpreter health route, so no test depends on the internet.
HEALTH = "http://127.0.0.1:49999/health"
CASES = [
    ("numpy", "import numpy as np\nint(np.arange(10).reshape(2, 5).sum(axis=1)[1])", "35"),
    ("pandas", "import pandas as pd\ndf = pd.DataFrame({'g': ['a', 'b', 'a'], 'v': [1, 2, 3]})\nint(df.groupby('g')['v'].sum()['a'])", "4"),
    ("scipy", "from scipy import optimize\nround(float(optimize.minimize_scalar(lambda x: (x - 2) ** 2).x), 4)", "2.0"),
    ("scikit-learn", "from sklearn.linear_model import LinearRegression\nm = LinearRegression().fit([[0], [1], [2]], [1, 3, 5])\nround(float(m.coef_[0]), 6), round(float(m.intercept_), 6)", "(2.0, 1.0)"),
    ("joblib", "from joblib import Parallel, delayed\nParallel(n_jobs=2)(delayed(pow)(i, 2) for i in range(4))", "[0, 1, 4, 9]"),
    ("sympy", "import sympy as sp\nx = sp.symbols('x')\nsorted(sp.solve(x**2 - 4, x))", "[-2, 2]"),
    ("requests", f"import requests\nr = requests.get('{HEALTH}', timeout=5)\nr.status_code, r.json()", "(200, 'OK')"),
    ("urllib3", f"import urllib3\nr = urllib3.PoolManager().request('GET', '{HEALTH}')\nr.status, r.data.decode()", "(200, '\"OK\"')"),
    ("aiohttp", f"import aiohttp\nasync def get():\n    async with aiohttp.ClientSession() as s:\n        async with s.get('{HEALTH}') as r:\n            return r.status, await r.text()\nawait get()", "(200, '\"OK\"')"),
    ("beautifulsoup4", "from bs4 import BeautifulSoup\nsoup = BeautifulSoup('<ul><li>a</li><li class=\"x\">b</li></ul>', 'html.parser')\n[li.text for li in soup.find_all('li')], soup.select_one('.x').text", "(['a', 'b'], 'b')"),
    ("openpyxl", "import openpyxl\nwb = openpyxl.Workbook(); wb.active.append(['a', 1]); wb.save('/tmp/guestd-t.xlsx')\nws = openpyxl.load_workbook('/tmp/guestd-t.xlsx').active\n[c.value for c in ws[1]]", "['a', 1]"),
    ("xlrd", (
        # A minimal BIFF2 worksheet (xlrd reads .xls; nothing in the set writes one).
        "import struct, xlrd\n"
        "def rec(i, d): return struct.pack('<HH', i, len(d)) + d\n"
        "def label(r, c, s): return rec(4, struct.pack('<HH', r, c) + bytes(3) + bytes([len(s)]) + s.encode())\n"
        "def number(r, c, v): return rec(3, struct.pack('<HH', r, c) + bytes(3) + struct.pack('<d', v))\n"
        "open('/tmp/guestd-t.xls', 'wb').write(rec(9, struct.pack('<HH', 2, 16)) + label(0, 0, 'apple') + number(0, 1, 3.0) + rec(10, b''))\n"
        "xlrd.open_workbook('/tmp/guestd-t.xls', logfile=open('/dev/null', 'w')).sheet_by_index(0).row_values(0)"
    ), "['apple', 3.0]"),
    ("python-docx", "import docx\nd = docx.Document(); d.add_heading('Title', 0); d.add_paragraph('Hello'); d.save('/tmp/guestd-t.docx')\n[p.text for p in docx.Document('/tmp/guestd-t.docx').paragraphs]", "['Title', 'Hello']"),
    ("pytz", "import pytz, datetime\nt = pytz.timezone('Europe/Paris').localize(datetime.datetime(2024, 7, 1, 12))\nt.astimezone(pytz.utc).hour", "10"),
    ("xarray", "import xarray as xr, numpy as np\nda = xr.DataArray(np.arange(6).reshape(2, 3), dims=('x', 'y'))\nda.mean(dim='x').values.tolist()", "[1.5, 2.5, 3.5]"),
    ("nltk", "from nltk.stem import PorterStemmer\nfrom nltk.tokenize import wordpunct_tokenize\n[PorterStemmer().stem(w) for w in wordpunct_tokenize('running dogs')]", "['run', 'dog']"),
    ("textblob", "from textblob import TextBlob\nTextBlob('I love this wonderful library').sentiment.polarity > 0.5", "True"),
    ("gensim", "from gensim.models import Word2Vec\nm = Word2Vec([['cat', 'dog', 'pet']] * 20, vector_size=8, min_count=1, seed=1, workers=1)\nm.wv['cat'].shape, sorted(m.wv.index_to_key)", "((8,), ['cat', 'dog', 'pet'])"),
    ("spacy", "import spacy\n[t.text for t in spacy.blank('en')('Hello, world!')]", "['Hello', ',', 'world', '!']"),
    ("numba", "from numba import njit\n@njit\ndef total(n):\n    s = 0\n    for i in range(n):\n        s += i\n    return s\ntotal(100)", "4950"),
    ("opencv-python", "import cv2, numpy as np\nimg = np.zeros((4, 4, 3), np.uint8); img[:] = (0, 0, 255)\nok, png = cv2.imencode('.png', img)\nok, png[:4].tobytes() == b'\\x89PNG', cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[0, 0]", "(True, True, 76)"),
    ("imageio", "import imageio.v3 as iio, numpy as np\niio.imwrite('/tmp/guestd-t.png', np.full((3, 4), 7, np.uint8))\niio.imread('/tmp/guestd-t.png').shape", "(3, 4)"),
    ("scikit-image", "import numpy as np\nfrom skimage import filters, transform\nimg = np.zeros((8, 8)); img[:, 4:] = 1\ntransform.resize(img, (4, 4)).shape, bool(filters.sobel(img)[:, 3:5].max() > 0)", "((4, 4), True)"),
    ("soundfile", "import soundfile as sf, numpy as np\nsf.write('/tmp/guestd-t.wav', np.zeros(800), 8000)\ndata, rate = sf.read('/tmp/guestd-t.wav')\nlen(data), rate", "(800, 8000)"),
    ("librosa", "import librosa, numpy as np\ny = librosa.tone(440, sr=22050, duration=0.5)\nf0 = librosa.yin(y, fmin=200, fmax=800, sr=22050)\nround(float(np.median(f0)))", "440"),
    ("bokeh", "from bokeh.plotting import figure\nfrom bokeh.embed import file_html\nfrom bokeh.resources import CDN\np = figure(title='t'); p.line([1, 2, 3], [4, 6, 5])\n'Bokeh' in file_html(p, CDN, 'plot')", "True"),
    ("pytest", "import pytest, pathlib\npathlib.Path('/tmp/guestd_t_test.py').write_text('def test_ok():\\n    assert 1 + 1 == 2\\n')\nint(pytest.main(['-q', '-p', 'no:cacheprovider', '/tmp/guestd_t_test.py']))", "0"),
]


@pytest.mark.parametrize("package, code, expected", CASES, ids=[c[0] for c in CASES])
def test_package_does_its_typical_thing(sandbox, package, code, expected):
    execution = sandbox.run_code(code, timeout=240)
    assert execution.error is None, f"{package}: {execution.error}"
    assert execution.text == expected, f"{package}: {execution.text!r}"


def test_every_template_package_has_a_case():
    lean_only = {"ipykernel", "ipython", "orjson", "e2b-charts", "bash_kernel", "numpy",
                 "pandas", "matplotlib", "pillow"}
    covered = {c[0] for c in CASES} | {"plotly", "kaleido", "seaborn"} | lean_only
    assert set(pins()) <= covered, set(pins()) - covered


def test_seaborn_plot_is_a_displayed_figure(sandbox):
    execution = sandbox.run_code(
        "import seaborn as sns, pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.DataFrame({'x': [1, 2, 3, 4], 'y': [2, 4, 1, 3]})\n"
        "sns.lineplot(data=df, x='x', y='y')\nplt.title('sns')\nplt.show()"
    )
    assert execution.error is None, execution.error
    result = execution.results[0]
    assert result.png
    assert result.chart is not None and result.chart.title == "sns"


def test_plotly_figure_and_static_export(sandbox):
    execution = sandbox.run_code(
        "import plotly.express as px\n"
        "fig = px.bar(x=['a', 'b'], y=[1, 3], title='px')\n"
        "fig.write_image('/tmp/guestd-plotly.png')\n"
        "open('/tmp/guestd-plotly.png', 'rb').read(4)",
        timeout=240,
    )
    assert execution.error is None, execution.error
    assert execution.text == "b'\\x89PNG'"
