"""Is napari responsive while the widget fine-tunes, and does the GUI cost training speed?

Runs the same fine-tuning job (cardiac MRI phantom, 2 labelled slices) three
ways in one process, alternating: headless (``train.finetune.run`` in this
process), in the widget with the child-process runner (the default), and in
the widget with the thread runner. While the widget trains, a QTimer probe
firing every 10 ms records how late each tick is: the event-loop gap a user
feels as a frozen window. Prints JSON.

Goals: longest gap < 100 ms; GUI training within 10 % of headless speed.

    xvfb-run -a python benchmarks/gui_responsiveness.py [--steps 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SLICES = (20, 44)


def _steps_per_s(progress_times: list[float]) -> float:
    """Training speed from the arrival times of Progress events (skips warm-up steps)."""
    t = progress_times[3:]
    return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 2 else float("nan")


def _job(steps: int, out_dir: Path):
    from napari_fewlabel.data.phantoms import cardiac_phantom
    from napari_fewlabel.train.finetune import FinetuneJob

    phantom = cardiac_phantom("MR", shape=(64, 160, 160), spacing_mm=(2.0, 1.5, 1.5))
    painted = np.zeros_like(phantom.labels.array)
    painted[list(SLICES)] = phantom.labels.array[list(SLICES)]
    return FinetuneJob(
        image=phantom.image,
        labels=painted,
        out=out_dir / "bench.safetensors",
        classes=phantom.classes,
        steps=steps,
        device="cpu",
    )


def headless(steps: int, out_dir: Path) -> float:
    from napari_fewlabel.train.events import Progress
    from napari_fewlabel.train.finetune import run

    times = [time.perf_counter() for e in run(_job(steps, out_dir)) if isinstance(e, Progress)]
    return _steps_per_s(times)


def in_widget(steps: int, out_dir: Path, runner: str) -> dict[str, float]:
    import napari
    from event_loop_probe import GapProbe
    from qtpy.QtCore import QEventLoop

    from napari_fewlabel.jobs import finetune_and_predict
    from napari_fewlabel.napari._runner import ThreadRunner
    from napari_fewlabel.napari._widget import FinetuneWidget
    from napari_fewlabel.train.events import Progress

    viewer = napari.Viewer(show=True)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    if runner == "thread":
        widget.runner = ThreadRunner(widget)
        widget.runner.job_event.connect(widget._on_event)
        widget.runner.job_finished.connect(widget._on_finished)
    progress_times: list[float] = []
    widget.runner.job_event.connect(
        lambda e: progress_times.append(time.perf_counter()) if isinstance(e, Progress) else None
    )
    probe = GapProbe()
    probe.start()
    # Wait the way napari's own event loop waits (blocked until something happens), not
    # by polling: a polling loop would take CPU from training on a 2-core machine.
    loop = QEventLoop()
    widget.runner.job_finished.connect(loop.quit)
    widget._start_job("finetune", finetune_and_predict, _job(steps, out_dir))
    loop.exec()
    probe.stop()
    viewer.close()
    return {"steps_per_s": _steps_per_s(progress_times), **probe.figures()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list] = {"headless": [], "process": [], "thread": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(args.repeats):
            results["headless"].append(headless(args.steps, out))
            results["process"].append(in_widget(args.steps, out, "process"))
            results["thread"].append(in_widget(args.steps, out, "thread"))
    headless_speed = statistics.median(results["headless"])
    summary = {}
    for kind in ("process", "thread"):
        runs = results[kind]
        speed = statistics.median(r["steps_per_s"] for r in runs)
        summary[kind] = {
            "steps_per_s": round(speed, 3),
            "speed_vs_headless": round(speed / headless_speed, 3),
            "longest_gap_ms": round(max(r["longest_gap_ms"] for r in runs), 1),
            "p99_gap_ms": round(max(r["p99_gap_ms"] for r in runs), 1),
        }
    print(
        json.dumps(
            {
                "benchmark": "gui_responsiveness",
                "steps": args.steps,
                "repeats": args.repeats,
                "headless_steps_per_s": round(headless_speed, 3),
                "runners": summary,
                "goals": "longest gap < 100 ms; speed_vs_headless >= 0.9",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
