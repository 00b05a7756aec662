"""The "Lungs and emphysema" widget in a real napari viewer (Xvfb) on the real lung1 CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import real_data
from napari_fewlabel.data.emphysema_phantom import emphysema_phantom
from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.infer.lungs import LEFT_LUNG, RIGHT_LUNG
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.napari._emphysema_widget import EmphysemaWidget
from napari_fewlabel.napari._layers import image_layer_data
from napari_fewlabel.train.events import Done, Progress
from notifications import notifications
from subtype_regions import labelled_blobs

pytestmark = pytest.mark.gui
PLUGIN = "napari-fewlabel"


@pytest.fixture
def viewer_with_lung1(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(real_data.lung1_image()), plugin=PLUGIN)
    widget = EmphysemaWidget(viewer)
    viewer.window.add_dock_widget(widget)
    yield viewer, widget
    widget.runner.shutdown()


def test_measure_shows_lungs_laa_and_the_table(viewer_with_lung1, qtbot, tmp_path):
    viewer, widget = viewer_with_lung1
    ct = widget.selected_image()
    assert ct is not None
    assert widget.measure()
    assert widget.measure_button.text() == "Cancel"
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)

    lungs = viewer.layers[f"{ct.name} lungs"]
    laa = viewer.layers[f"{ct.name} LAA-950"]
    assert np.allclose(lungs.scale, ct.scale) and np.allclose(lungs.translate, ct.translate)
    assert {RIGHT_LUNG, LEFT_LUNG} <= set(np.unique(lungs.data))
    assert [c["name"] for c in lungs.metadata["fewlabel_classes"]][1:] == [
        "right lung",
        "left lung",
    ]
    # The table's whole-lung %LAA-950 is what numpy says over the lungs layer.
    hu = np.asarray(ct.data)
    lung = np.asarray(lungs.data) > 0
    expected = 100.0 * np.count_nonzero(hu[lung] < -950) / np.count_nonzero(lung)
    assert widget.table.rowCount() == 6
    assert widget.table.item(0, 0).text() == "both lungs"
    assert float(widget.table.item(0, 2).text()) == pytest.approx(expected, abs=0.01)
    assert np.array_equal(np.asarray(laa.data) > 0, lung & (hu < -950))
    assert "%LAA-950 of both lungs" in widget.status.text()
    assert widget.measure_button.text() == "Measure"

    written = widget.export_table(tmp_path / "scores.csv")
    with open(written, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["region"] for r in rows][:3] == ["both lungs", "right lung", "left lung"]
    assert float(rows[0]["laa_percent"]) == pytest.approx(expected, abs=0.01)
    as_json = json.loads(widget.export_table(tmp_path / "scores.json").read_text())
    assert as_json["laa_percent"] == pytest.approx(expected, abs=0.01)


def test_cancel_ends_the_measurement(viewer_with_lung1, qtbot):
    _, widget = viewer_with_lung1
    assert widget.measure()
    widget._on_measure_cancel()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=30_000)
    assert widget.status.text() == "Cancelled."
    assert widget.measure_button.text() == "Measure"
    assert widget.report is None


def test_refusals_and_errors_arenotifications(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = EmphysemaWidget(viewer)
    messages = notifications(widget.measure)
    assert any("Open a chest CT first" in m for m in messages)
    messages = notifications(lambda: widget.export_table(Path("x.csv")))
    assert any("press Measure first" in m for m in messages)

    # An MR layer is not offered. Without a known modality it is, and the job refuses it
    # (no air at -1000 HU): the message comes back as a notification.
    mr = cardiac_phantom("MR", 0, (16, 64, 64), (4.0, 3.0, 3.0))
    data, kwargs, _ = image_layer_data(mr.image, "mr")
    viewer.add_image(data, **kwargs)
    assert widget.image_combo.count() == 0
    viewer.layers["mr"].metadata = {}  # no modality known: offered, scored as CT
    widget._refresh_layers()
    assert widget.image_combo.count() == 1
    failures = []
    widget.runner.job_failed.connect(failures.append)
    assert widget.measure()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=60_000)
    assert len(failures) == 1 and failures[0].user_error
    assert "does not look like CT in Hounsfield units" in failures[0].message
    assert "does not look like CT" in widget.status.text()
    widget.runner.shutdown()


@pytest.fixture(scope="module")
def emphysema():
    return emphysema_phantom(0)


@pytest.fixture
def viewer_with_phantom(make_napari_viewer, emphysema):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(emphysema.scan, "chest")
    viewer.add_image(data, **kwargs)
    widget = EmphysemaWidget(viewer)
    viewer.window.add_dock_widget(widget)
    yield viewer, widget
    widget.runner.shutdown()


def test_subtype_map_from_painted_regions(viewer_with_phantom, emphysema, qtbot):
    viewer, widget = viewer_with_phantom
    layer = widget.new_subtype_layer()
    assert layer is not None and widget.selected_regions() is layer
    assert np.allclose(layer.scale, viewer.layers["chest"].scale)
    truth = emphysema.labels.array
    layer.data = labelled_blobs(truth, emphysema.scan.spacing_mm, per_class=6)
    widget.subtype_steps.setValue(40)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start_subtypes()
    assert widget.subtype_button.text() == "Stop"
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=600_000)

    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 41))
    subtypes = viewer.layers["Emphysema subtypes (chest)"]
    assert subtypes.data.shape == truth.shape
    assert np.allclose(subtypes.scale, viewer.layers["chest"].scale)
    assert set(np.unique(subtypes.data)) <= {0, 1, 2, 3, 4}
    # The map covers the lungs (the phantom's lungs are where its truth is non-zero).
    overlap = np.count_nonzero((subtypes.data > 0) & (truth > 0)) / np.count_nonzero(truth)
    assert overlap > 0.9
    shares = [float(widget.subtype_table.item(r, 1).text()) for r in range(4)]
    assert sum(shares) == pytest.approx(100, abs=0.5)
    assert widget.subtype_status.text().startswith("Subtype map ready")
    assert widget.subtype_button.text() == "Start"


def test_subtype_stop_keeps_the_classifier_and_maps(viewer_with_phantom, emphysema, qtbot):
    viewer, widget = viewer_with_phantom
    layer = widget.new_subtype_layer()
    layer.data = labelled_blobs(emphysema.labels.array, emphysema.scan.spacing_mm, per_class=2)
    widget.subtype_steps.setValue(100_000)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start_subtypes()
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in events), timeout=300_000)
    widget._on_subtype_start_stop()  # Stop
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and done[0].cancelled
    assert "Emphysema subtypes (chest)" in viewer.layers


def test_subtypes_refused_without_regions(viewer_with_phantom):
    viewer, widget = viewer_with_phantom
    messages = notifications(widget.start_subtypes)
    assert any("paint a few regions" in m for m in messages)
    viewer.add_labels(np.zeros((4, 4, 4), np.uint8), name="wrong grid")
    widget.regions_combo.setCurrentIndex(widget.regions_combo.findText("wrong grid"))
    messages = notifications(widget.start_subtypes)
    assert any("use 'New subtype layer'" in m for m in messages)
    assert not widget.runner.is_running


def test_regions_on_another_open_ct_join_the_training(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = EmphysemaWidget(viewer)
    small = {"shape": (40, 52, 72), "spacing_mm": (4.0, 4.0, 4.0)}
    for seed, name in ((0, "first"), (1, "second")):
        ph = emphysema_phantom(seed, **small)
        data, kwargs, _ = image_layer_data(ph.scan, name)
        viewer.add_image(data, **kwargs)
        widget.image_combo.setCurrentIndex(widget.image_combo.findText(name))
        layer = widget.new_subtype_layer()
        truth = ph.labels.array
        layer.data = np.where(np.isin(truth, (1, 2) if seed == 0 else (3, 4)), truth, 0)
    widget.image_combo.setCurrentIndex(widget.image_combo.findText("first"))
    widget.regions_combo.setCurrentIndex(widget.regions_combo.findText("first subtype regions"))
    widget.other_cts_check.setChecked(True)
    widget.subtype_steps.setValue(10)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start_subtypes()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1
    card = read_card(done[0].checkpoint)
    assert len(card.training["scans"]) == 2
    assert card.training["classes_trained"] == [1, 2, 3, 4]  # two from each CT
    assert "Emphysema subtypes (first)" in viewer.layers
    widget.runner.shutdown()
