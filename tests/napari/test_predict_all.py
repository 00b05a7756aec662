"""Predict all open scans and DICOM SEG export, in a real napari viewer (Xvfb), with a tiny
untrained model: the mechanics (layers, names, geometry, stop, failures, files), not accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_writer import write_ct_series
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io import Volume, load_volume, save_image
from napari_fewlabel.io.dicom_seg import read_dicom_seg
from napari_fewlabel.jobs import PredictionProgress, ScanSegmented, ScansPredicted, ScanStarted
from napari_fewlabel.models.checkpoint import save_checkpoint
from napari_fewlabel.napari._layers import CLASSES_KEY, PREDICTION_KEY, image_layer_data
from napari_fewlabel.napari._widget import (
    NIFTI_FILTER,
    PREDICT_ALL,
    SEG_FILTER,
    FinetuneWidget,
    class_volumes_text,
)
from notifications import notifications
from tiny_model import make_model

pytestmark = pytest.mark.gui
PLUGIN = "napari-fewlabel"


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_model()
    folder = tmp_path_factory.mktemp("model")
    return save_checkpoint(folder / "tiny.safetensors", model.network, model.card)


@pytest.fixture
def viewer_and_widget(make_napari_viewer, tiny_model_file):
    viewer = make_napari_viewer()
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.add_model_file(tiny_model_file)
    yield viewer, widget
    widget.runner.shutdown()


def _scan(shape, spacing_mm=(1.0, 1.0, 1.0), *, seed=0, origin=(0.0, 0.0, 0.0)) -> Volume:
    array = np.random.default_rng(seed).normal(300, 80, size=shape).astype(np.float32)
    return Volume.from_array(array, spacing_mm, modality="MR", origin_lps_mm=origin)


def _add_scan(viewer, volume: Volume, name: str):
    data, kwargs, _ = image_layer_data(volume, name)
    return viewer.add_image(data, **kwargs)


def _wait_done(qtbot, widget, timeout_ms=120_000):
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=timeout_ms)


def test_every_open_scan_gets_its_prediction_and_a_bad_one_is_notified(
    viewer_and_widget, qtbot, tiny_model_file
):
    viewer, widget = viewer_and_widget
    scans = {
        "first": _scan((8, 24, 20), (2.0, 1.0, 1.5), seed=1),
        "second": _scan((6, 16, 16), (1.0, 0.8, 0.8), seed=2, origin=(10.0, -5.0, 30.0)),
    }
    _add_scan(viewer, scans["first"], "first")
    _add_scan(viewer, scans["second"], "second")
    viewer.add_image(np.zeros((16, 16), np.float32), name="photo")  # 2D: left out at once
    # 3D, but fails in the job: every voxel is NaN (shown with a fixed window, as napari
    # cannot derive one from NaN).
    blank = Volume.from_array(np.full((4, 8, 8), np.nan, np.float32), modality="MR")
    data, kwargs, _ = image_layer_data(blank, "blank")
    viewer.add_image(data, **{**kwargs, "contrast_limits": (0.0, 1.0)})
    widget.image_combo.setCurrentText("first")

    events, status_at_start = [], []
    widget.runner.job_event.connect(events.append)
    # Connected after the widget's own slot: sees the status line the widget has just set.
    widget.runner.job_event.connect(
        lambda e: status_at_start.append(widget.status.text()) if isinstance(e, ScanStarted) else 0
    )
    status_in_scan = []
    widget.runner.job_event.connect(
        lambda e: (
            status_in_scan.append(widget.status.text()) if isinstance(e, PredictionProgress) else 0
        )
    )
    messages = notifications(lambda: (widget.predict_all_open_scans(), _wait_done(qtbot, widget)))

    assert [(e.number, e.total, e.name) for e in events if isinstance(e, ScanStarted)] == [
        (1, 3, "first"),
        (2, 3, "second"),
        (3, 3, "blank"),
    ]
    assert "Predicting scan 2 of 3: second..." in status_at_start
    # Within a scan, the status line says how far it is (the bar counts scans).
    finished = [e for e in events if isinstance(e, PredictionProgress) and e.done == e.total]
    assert len(finished) == 2 and all(e.total > 0 for e in finished)
    assert "Predicting scan 2 of 3: second (100%)..." in status_in_scan
    assert any("'photo' is left out" in m and "3D" in m for m in messages), messages
    assert any("'blank' was not predicted" in m and "NaN" in m for m in messages), messages
    (end,) = [e for e in events if isinstance(e, ScansPredicted)]
    assert (end.predicted, end.failed, end.total, end.stopped) == (2, 1, 3, False)
    assert "photo prediction" not in viewer.layers and "blank prediction" not in viewer.layers

    model = make_model()
    for name, volume in scans.items():
        image, layer = viewer.layers[name], viewer.layers[f"{name} prediction"]
        assert layer.data.shape == volume.shape
        assert layer.metadata[PREDICTION_KEY]
        assert [c["name"] for c in layer.metadata[CLASSES_KEY]] == list(model.card.class_names)
        assert np.allclose(layer.scale, image.scale)
        assert np.allclose(layer.translate, image.translate)
        expected = predict_volume(model, volume, device="cpu")
        assert np.mean(np.asarray(layer.data) == expected) > 0.99
        # The summary gives each scan's per-class volumes, as a single prediction does.
        volumes = class_volumes_text(np.asarray(layer.data), model.card.classes, volume.spacing_mm)
        assert f"{name}: {volumes}" in widget.status.text()
    assert widget.status.text().startswith("Predicted 2 of 3 scan(s) (1 failed; 1 layer(s)")
    assert widget.predict_all_button.text() == PREDICT_ALL
    assert widget.export_button.isEnabled()
    # The prediction of the scan chosen in '1. Scan' is the one Refine works on.
    assert widget._prediction_layer is viewer.layers["first prediction"]


def test_stop_ends_predict_all_within_seconds_and_adds_no_further_layer(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _add_scan(viewer, _scan((6, 16, 16), seed=1), "first")
    # Thousands of slices: a dozen seconds to predict whole, so a Stop that waited for
    # the end of the scan would show in the time it takes.
    _add_scan(viewer, _scan((12_000, 32, 32), seed=2), "big")
    _add_scan(viewer, _scan((6, 16, 16), seed=3), "third")
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.predict_all_open_scans()
    assert widget.predict_all_button.text() == "Stop"
    qtbot.waitUntil(
        lambda: any(isinstance(e, ScanStarted) and e.name == "big" for e in events),
        timeout=120_000,
    )
    assert "first prediction" in viewer.layers
    stopped_at = time.monotonic()
    widget.predict_all_button.click()  # the button is Stop while it runs
    assert widget.start_button.text() == "Cancel prediction"
    _wait_done(qtbot, widget, timeout_ms=30_000)
    took = time.monotonic() - stopped_at
    assert took < 5.0, took

    layers = len(viewer.layers)
    qtbot.wait(300)  # nothing arrives after the end
    assert len(viewer.layers) == layers
    assert "big prediction" not in viewer.layers and "third prediction" not in viewer.layers
    assert [e.name for e in events if isinstance(e, ScanSegmented)] == ["first"]
    (end,) = [e for e in events if isinstance(e, ScansPredicted)]
    assert end.stopped and end.predicted == 1
    assert widget.status.text().startswith("Stopped: predicted 1 of 3 scan(s): first: ")
    assert widget.predict_all_button.text() == PREDICT_ALL
    assert widget.start_button.text() == "Start"


def test_dicom_seg_export_of_a_dicom_scan_and_refusal_for_a_nifti_scan(
    viewer_and_widget, qtbot, tmp_path, monkeypatch
):
    viewer, widget = viewer_and_widget
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(7, 12, 10)).astype(np.int16)
    series = write_ct_series(
        tmp_path / "series",
        hu,
        first_position=np.array([-50.0, 20.0, 100.0]),
        pixel_spacing=(0.8, 0.6),
        slice_step_mm=2.5,
        row_cosines=(1.0, 0.0, 0.0),
        col_cosines=(0.0, -1.0, 0.0),  # rows toward A: the display flips them
    )
    (dicom_image,) = viewer.open(str(series.folder), plugin=PLUGIN)
    nifti_path = save_image(_scan((5, 9, 11), (1.5, 1.0, 1.0)), tmp_path / "scan.nii.gz")
    (nifti_image,) = viewer.open(str(nifti_path), plugin=PLUGIN)
    assert widget.predict_all_open_scans()
    _wait_done(qtbot, widget)
    dicom_prediction = viewer.layers[f"{dicom_image.name} prediction"]
    nifti_prediction = viewer.layers[f"{nifti_image.name} prediction"]

    # A corrected prediction, in places no flip or transpose maps onto themselves.
    labels = np.zeros(dicom_prediction.data.shape, np.uint8)
    labels[1, 2:5, 1:4] = 1
    labels[1, 2, 1] = 2
    labels[-2, -3, -2] = 2
    dicom_prediction.data = labels
    viewer.layers.selection.active = dicom_prediction

    asked = []

    def save_dialog(parent, caption, default, filters):
        asked.append(filters)
        return str(tmp_path / "from dialog"), filters.split(";;")[-1]

    monkeypatch.setattr("napari_fewlabel.napari._widget.QFileDialog.getSaveFileName", save_dialog)
    widget.export_button.click()
    assert asked[-1] == f"{NIFTI_FILTER};;{SEG_FILTER}"
    written = tmp_path / "from dialog.dcm"  # the SEG filter chosen: .dcm added
    back = read_dicom_seg(written, like=load_volume(series.folder))
    assert back.any() and np.array_equal(back, labels)
    segments = pydicom.dcmread(written).SegmentSequence
    names = [c["name"] for c in dicom_prediction.metadata[CLASSES_KEY]]
    assert [s.SegmentLabel for s in segments] == names[1:]

    # A scan read from NIfTI: .dcm is refused with a sentence, nothing is written.
    viewer.layers.selection.active = nifti_prediction
    widget.export_button.click()
    assert asked[-1] == NIFTI_FILTER  # no SEG offered
    refused = tmp_path / "nifti-seg.dcm"
    messages = notifications(lambda: widget.export_mask(refused))
    assert any("export NIfTI instead" in m for m in messages), messages
    assert not refused.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("nifti-seg")]
    # NIfTI export of the selected prediction (not the DICOM one) still works.
    mask = widget.export_mask(tmp_path / "nifti-mask.nii.gz")
    assert mask is not None and load_volume(mask).shape == nifti_prediction.data.shape


def test_a_single_prediction_shows_its_slices_on_the_bar(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _add_scan(viewer, _scan((10, 16, 16), seed=3), "scan")
    widget.image_combo.setCurrentText("scan")
    bar_at_progress = []
    widget.runner.job_event.connect(
        lambda e: (
            bar_at_progress.append(
                (widget.progress.format(), widget.progress.value(), widget.progress.maximum())
            )
            if isinstance(e, PredictionProgress)
            else 0
        )
    )
    assert widget.predict_with_selected_model()
    _wait_done(qtbot, widget)
    assert bar_at_progress, "no PredictionProgress reached the widget"
    fmt, value, maximum = bar_at_progress[-1]
    assert fmt == "predicting: %p%" and value == maximum > 0
    assert "scan prediction" in viewer.layers
    assert widget.progress.format() == "%v / %m steps"  # back to training's units
