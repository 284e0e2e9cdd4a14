"""The floor of benches/kernel.rs: the same work through a bare jupyter_client against a
kernel started from the same kernelspec guestd uses. Prints one JSON object.

usage: python jupyter_baseline.py <iterations>
"""

import json
import statistics
import sys
import time

from jupyter_client.manager import start_new_kernel

WORK = {
    "stdout_50mb": "import sys\nchunk = 'a' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()",
    "figure": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2, 4])\nplt.title('bench')\nplt.show()",
}


def run(kc, code):
    """Executes and waits for idle and the reply; returns (seconds, stdout bytes, images)."""
    out = {"stdout": 0, "png": 0}

    def hook(msg):
        t = msg["header"]["msg_type"]
        if t == "stream" and msg["content"]["name"] == "stdout":
            out["stdout"] += len(msg["content"]["text"])
        elif t in ("display_data", "execute_result") and "image/png" in msg["content"]["data"]:
            out["png"] += 1

    t0 = time.perf_counter()
    reply = kc.execute_interactive(code, output_hook=hook, timeout=300)
    dt = time.perf_counter() - t0
    assert reply["content"]["status"] == "ok", reply["content"]
    return dt, out["stdout"], out["png"]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        for _ in range(20):
            run(kc, "x = 1")
        xs = sorted(run(kc, "x = 1")[0] for _ in range(n))
        big = run(kc, WORK["stdout_50mb"])
        fig_times = [run(kc, WORK["figure"]) for _ in range(5)]
        print(json.dumps({
            "x1_median_s": statistics.median(xs),
            "x1_p99_s": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))],
            "stdout_50mb_s": big[0],
            "stdout_50mb_bytes": big[1],
            "figure_median_s": statistics.median(t for t, _, _ in fig_times),
            "figure_pngs": fig_times[-1][2],
        }))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


main()
