"""Take the user guide's screenshots from a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py [--steps 300]

Writes docs/images/*.png: each step of the guide, as a user sees it, on the
synthetic cardiac MRI sample. Nothing is staged: the widget is driven through
the same methods its buttons call, and training and prediction really run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_fewlabel.demo import demo_case
from napari_fewlabel.napari._layers import image_layer_data
from napari_fewlabel.napari._widget import FinetuneWidget
from napari_fewlabel.train.events import Preview, Progress

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def _settle(app: QApplication, seconds: float = 0.5) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def _shot(viewer: napari.Viewer, app: QApplication, name: str) -> None:
    _settle(app)
    viewer.screenshot(str(OUT / name), canvas_only=False)
    print("wrote", OUT / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([])
    case = demo_case()
    viewer = napari.Viewer(title="napari-fewlabel")
    viewer.window._qt_window.resize(1600, 1000)
    data, kwargs, _ = image_layer_data(case.phantom.image, "cardiac MR phantom")
    viewer.add_image(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune and segment", area="right")
    z = case.labelled_slices[0]
    viewer.dims.set_point(0, viewer.layers[0].translate[0] + z * viewer.layers[0].scale[0])
    _shot(viewer, app, "01_scan_and_widget.png")

    widget.preset_combo.setCurrentText("Cardiac phantom (sample data)")
    annotation = widget.new_annotation_layer()
    assert annotation is not None
    annotation.data = case.annotation.astype(annotation.data.dtype)
    widget._update_slice_count()
    _shot(viewer, app, "02_two_slices_labelled.png")

    widget.steps_spin.setValue(args.steps)
    seen: list[Progress] = []
    previews: list[Preview] = []
    widget.runner.job_event.connect(lambda e: seen.append(e) if isinstance(e, Progress) else None)
    widget.runner.job_event.connect(
        lambda e: previews.append(e) if isinstance(e, Preview) else None
    )
    # Training is followed on an unpainted slice: the live preview shows it.
    other = next(
        s for s in range(case.phantom.image.shape[0] // 2, 0, -1) if s not in case.labelled_slices
    )
    viewer.dims.set_point(0, viewer.layers[0].translate[0] + other * viewer.layers[0].scale[0])
    widget.start()
    while widget.runner.is_running and (
        not seen or seen[-1].step < args.steps // 2 or not previews
    ):
        _settle(app, 0.2)
    _shot(viewer, app, "03_training.png")
    while widget.runner.is_running:
        _settle(app, 0.2)

    annotation.visible = False
    viewer.layers.selection.active = viewer.layers["cardiac MR phantom prediction"]
    _shot(viewer, app, "04_prediction.png")
    viewer.dims.ndisplay = 3
    viewer.layers["cardiac MR phantom"].visible = False
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.angles = (-20, 30, 140)
    _shot(viewer, app, "05_prediction_3d.png")
    print(widget.status.text())
    assert np.asarray(viewer.layers["cardiac MR phantom prediction"].data).any()

    # Label next: the view turns to the slice the model is least sure of.
    viewer.layers["cardiac MR phantom"].visible = True
    annotation.visible = True
    widget.label_next()
    while widget.runner.is_running:
        _settle(app, 0.2)
    _shot(viewer, app, "06_label_next.png")
    print(widget.status.text())

    # The user paints that slice (here: the phantom's truth there) and presses Refine.
    axis, index = widget._slice_on_screen()
    truth = np.take(case.phantom.labels.array, index, axis=axis)
    region = [slice(None)] * 3
    region[axis] = slice(index, index + 1)
    annotation.data[tuple(region)] = np.expand_dims(truth, axis).astype(annotation.data.dtype)
    annotation.events.data()
    widget.refine()
    while widget.runner.is_running:
        _settle(app, 0.2)
    viewer.layers.selection.active = viewer.layers["cardiac MR phantom prediction"]
    _shot(viewer, app, "07_refined.png")
    print(widget.status.text())
    viewer.close()


if __name__ == "__main__":
    main()
