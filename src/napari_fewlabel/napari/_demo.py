"""`fewlabel demo`: napari with the widget docked and the cardiac sample ready to go.

The sample's two slices are already painted into the annotation layer (from
the phantom's truth) so a newcomer only has to press Start. With
``screenshot`` set (used when there is no display: the README command then
runs napari on Xvfb), the demo presses Start itself, waits for the
prediction, saves a screenshot of the whole window and quits.
"""

from __future__ import annotations

import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_fewlabel.demo import demo_case
from napari_fewlabel.napari._layers import image_layer_data
from napari_fewlabel.napari._widget import FinetuneWidget


def open_demo(*, steps: int | None = None) -> tuple[napari.Viewer, FinetuneWidget]:
    case = demo_case()
    viewer = napari.Viewer(title="napari-fewlabel demo: press Start")
    data, kwargs, _ = image_layer_data(case.phantom.image, "cardiac MR phantom")
    viewer.add_image(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune and segment", area="right")
    widget.preset_combo.setCurrentText("Cardiac phantom (sample data)")
    annotation = widget.new_annotation_layer()
    assert annotation is not None
    annotation.data = case.annotation.astype(annotation.data.dtype)
    annotation.name = "annotation (2 slices)"
    annotation.mode = "pan_zoom"
    if steps:
        widget.steps_spin.setValue(steps)
    middle = case.labelled_slices[0]
    viewer.dims.set_point(0, viewer.layers[0].translate[0] + middle * viewer.layers[0].scale[0])
    widget.status.setText(
        f"Slices {case.labelled_slices[0]} and {case.labelled_slices[1]} are labelled. "
        "Press Start to fine-tune and segment the other "
        f"{case.phantom.image.shape[0] - 2} slices."
    )
    return viewer, widget


def run_demo(*, steps: int | None = None, screenshot: Path | None = None) -> int:
    viewer, widget = open_demo(steps=steps)
    if screenshot is None:
        napari.run()
        return 0
    app = QApplication.instance()
    assert app is not None
    viewer.window._qt_window.resize(1600, 1000)
    widget.start()
    while widget.runner.is_running:
        app.processEvents()
        time.sleep(0.02)
    for layer in viewer.layers:
        if layer.name.endswith("annotation (2 slices)"):
            layer.visible = False
    app.processEvents()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(screenshot), canvas_only=False)
    print(f"Screenshot of napari after the demo run: {screenshot}")
    print(widget.status.text())
    viewer.close()
    return 0
