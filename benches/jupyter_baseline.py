"""The floor of benches/kernel.rs: the same work through a bare jupyter_client against a
kernel started from the same kernelspec guestd uses.

usage: python jupyter_baseline.py serve
    Starts one kernel, prints {"ready": true}, then answers one command per stdin line
    with one JSON line, so the bench can interleave floor and guestd runs:
      x1 <n>    n round trips of `x = 1` (after 20 warm-ups): median and p99 seconds
      stdout    50 MB of stdout: seconds, bytes, and this process's CPU seconds
      figure    one matplotlib figure: seconds and PNG count
      quit
usage: python jupyter_baseline.py startup <kernelspec-name>
    A cold kernel start to the answer of its first `1+1`: prints {"seconds": s}.
"""

import json
import statistics
import sys
import time

from jupyter_client.manager import start_new_kernel

WORK = {
    "stdout": "import sys\nchunk = 'a' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()",
    "figure": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2, 4])\nplt.title('bench')\nplt.show()",
}


def run(kc, code):
    """Executes and waits for idle and the reply; returns (seconds, stdout bytes, images, results)."""
    out = {"stdout": 0, "png": 0, "results": []}

    def hook(msg):
        t = msg["header"]["msg_type"]
        if t == "stream" and msg["content"]["name"] == "stdout":
            out["stdout"] += len(msg["content"]["text"])
        elif t in ("display_data", "execute_result"):
            data = msg["content"]["data"]
            if "image/png" in data:
                out["png"] += 1
            out["results"].append(data.get("text/plain"))

    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, output_hook=hook, timeout=300)
    dt = time.perf_counter() - t0
    assert reply["content"]["status"] == "ok", reply["content"]
    return dt, out["stdout"], out["png"], out["results"]


def serve():
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        for _ in range(20):
            run(kc, "x = 1")
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "x1":
                xs = sorted(run(kc, "x = 1")[0] for _ in range(int(cmd[1])))
                res = {
                    "median_s": statistics.median(xs),
                    "p99_s": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))],
                }
            elif cmd[0] == "stdout":
                cpu = time.process_time()
                dt, n, _, _ = run(kc, WORK["stdout"])
                res = {"seconds": dt, "bytes": n, "cpu_s": time.process_time() - cpu}
            elif cmd[0] == "figure":
                dt, _, png, _ = run(kc, WORK["figure"])
                res = {"seconds": dt, "pngs": png}
            else:
                res = {"error": "unknown command " + cmd[0]}
            print(json.dumps(res), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def startup(kernel_name):
    t0 = time.perf_counter()
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=60)
    try:
        _, _, _, results = run(kc, "1+1")
        dt = time.perf_counter() - t0
        assert results == ["2"], results
        print(json.dumps({"seconds": dt}), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


if sys.argv[1:2] == ["startup"]:
    startup(sys.argv[2])
else:
    serve()
