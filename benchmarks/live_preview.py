"""Live preview in a real widget: time to the first preview, event-loop gaps, cost to training.

The default run a user starts on a brain MRI (the MNI152 2009 T1 at 1 mm,
197x233x189, a little larger than a 181x217x181 scan; grey and white matter
painted on 3 evenly spread axial slices), in the "Fine-tune and segment"
widget of a real napari viewer, with the view on an unlabelled axial slice in
the middle. For ``--seconds`` after Start it records when the first
``Preview`` reaches the layer, how many follow, the longest gap of a QTimer
probe firing every 10 ms (what a user feels as a frozen window), and the
training steps done; then Stop and Cancel prediction. The same is run with the
preview off (``preview_every_s = -1``) in the same process, so the cost of the
preview is a ratio of steps done, not a timing against another machine.
Prints JSON.

Goals (issue 23): first preview within 20 s of Start on 2 CPU cores; longest
event-loop gap under 100 ms.

    xvfb-run -a python benchmarks/live_preview.py [--seconds 60] [--case-file mni1mm.npz]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def _case(case_file: Path | None) -> Any:
    from annotation_efficiency import CLASS_NAMES, mni_volume
    from fewslice_cases import Case, read_case, write_case

    if case_file is not None and case_file.is_file():
        return read_case(case_file)
    image, truth = mni_volume(1)
    case = Case("mni-1mm-gm-wm", image, truth, CLASS_NAMES, "MNI152 2009 T1, 1 mm")
    if case_file is not None:
        write_case(case, case_file)
    return case


def session(case: Any, seconds: float, preview_every_s: float) -> dict[str, Any]:
    """One run in a fresh viewer; what the user saw in its first ``seconds``."""
    import napari
    from annotation_efficiency import evenly_spread
    from event_loop_probe import GapProbe
    from qtpy.QtCore import QEventLoop, QTimer

    from napari_fewlabel.data.classes import named_classes
    from napari_fewlabel.napari._layers import image_layer_data, labels_layer_data
    from napari_fewlabel.napari._widget import FinetuneWidget
    from napari_fewlabel.train.events import Preview, Progress

    labelled = evenly_spread(case.truth, 3)
    painted = np.zeros_like(case.truth, dtype=np.uint8)
    painted[labelled] = case.truth[labelled]
    viewer = napari.Viewer(show=True)
    data, kwargs, _ = image_layer_data(case.image, "mni")
    viewer.add_image(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    data, kwargs, _ = labels_layer_data(
        painted, case.image, "annotation", named_classes(case.class_names)
    )
    viewer.add_labels(data, **kwargs)
    widget.preview_every_s = preview_every_s
    middle = (labelled[0] + labelled[1]) // 2
    viewer.dims.set_current_step(0, middle)

    seen: dict[str, Any] = {"previews": 0, "first_preview_s": None, "steps": 0}
    started = [0.0]

    def on_event(event: Any) -> None:
        if isinstance(event, Preview):
            seen["previews"] += 1
            if seen["first_preview_s"] is None:
                seen["first_preview_s"] = round(time.perf_counter() - started[0], 1)
                seen["first_preview_slice"] = [event.axis, event.start, len(event.labels)]
        elif isinstance(event, Progress):
            seen["steps"] = event.step

    widget.runner.job_event.connect(on_event)
    probe = GapProbe()
    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    probe.start()
    started[0] = time.perf_counter()
    if not widget.start():
        raise RuntimeError(widget.status.text())
    loop.exec()  # wait as napari's own loop does, without polling
    probe.stop()
    steps = seen["steps"]
    widget.stop()  # Stop ...
    widget.stop()  # ... and Cancel prediction
    widget.runner.shutdown(timeout_s=10.0)
    viewer.close()
    return {
        "preview_every_s": preview_every_s,
        "seconds": seconds,
        "steps_done": steps,
        "previews": seen["previews"],
        "first_preview_s": seen["first_preview_s"],
        "first_preview_slice": seen.get("first_preview_slice"),
        **probe.figures(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--case-file", type=Path, help="the 1 mm MNI case (written if absent)")
    args = parser.parse_args()
    from napari_fewlabel.train.preview import PREVIEW_EVERY_S

    case = _case(args.case_file)
    on = session(case, args.seconds, PREVIEW_EVERY_S)
    off = session(case, args.seconds, -1.0)
    print(
        json.dumps(
            {
                "benchmark": "live_preview",
                "volume": "MNI152 T1 " + "x".join(map(str, case.image.shape[::-1])) + " (x, y, z)",
                "with_preview": on,
                "without_preview": off,
                "steps_ratio_with_to_without": round(
                    on["steps_done"] / max(1, off["steps_done"]), 3
                ),
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                },
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
