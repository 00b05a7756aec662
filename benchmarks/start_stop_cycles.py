"""Start/Stop 100 times through the widget's process runner: leaks and memory (issue 24).

Each cycle starts a real job in a spawned child (the same ``ProcessRunner``
the widget uses; the job is the runner tests' counting job, so a cycle takes
about a second rather than a training run's start-up), waits for its first
step, presses Stop and waits for the end. Recorded: child processes,
threads and open file descriptors of this process after the first cycle and
after the last, and the parent's resident memory along the way. Prints JSON.

    xvfb-run -a python benchmarks/start_stop_cycles.py [--cycles 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "napari"))


def _state(me: Any) -> dict[str, Any]:
    return {
        "children": len(me.children(recursive=True)),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mb": round(me.memory_info().rss / 2**20, 1),
    }


def cycles(n: int) -> dict[str, Any]:
    import psutil
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    import runner_jobs
    from napari_fewlabel.napari._runner import ProcessRunner
    from napari_fewlabel.train.events import Progress

    app = QApplication.instance() or QApplication([])
    runner = ProcessRunner()
    me = psutil.Process()
    loop = QEventLoop()

    def on_event(event: Any) -> None:
        if isinstance(event, Progress) and event.step == 1:
            runner.stop()

    runner.job_event.connect(on_event)
    runner.job_finished.connect(loop.quit)
    states, began = [], time.perf_counter()
    for i in range(n):
        runner.start(runner_jobs.count, 10_000, 0.01)
        loop.exec()
        if i in (0, n // 2, n - 1):
            end = QEventLoop()
            QTimer.singleShot(1000, end.quit)  # let the last child be reaped
            end.exec()
            states.append({"cycle": i + 1, **_state(me)})
    del app
    return {"cycles": n, "seconds": round(time.perf_counter() - began, 1), "states": states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    result = cycles(args.cycles)
    first, last = result["states"][0], result["states"][-1]
    print(
        json.dumps(
            {
                "benchmark": "start_stop_cycles",
                **result,
                "leaked": {k: last[k] - first[k] for k in ("children", "threads", "fds")},
                "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
