"""The "Fine-tune and segment" widget in a real napari viewer (Xvfb), with real training."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.infer.metrics import class_metrics
from napari_fewlabel.io import METADATA_KEY
from napari_fewlabel.models.checkpoint import load_checkpoint, load_optimizer_state
from napari_fewlabel.napari._layers import image_layer_data
from napari_fewlabel.napari._widget import FinetuneWidget
from napari_fewlabel.train.events import Done, Preview, Progress
from notifications import notifications

pytestmark = pytest.mark.gui
PLUGIN = "napari-fewlabel"
# As in tests/train/test_finetune_end_to_end.py: a third and two thirds up the heart.
LABELLED = (16, 32)
SPACING_MM = (2.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def small_phantom():
    """A smaller copy of the sample phantom so that real training fits in a test."""
    return cardiac_phantom("MR", seed=0, shape=(48, 96, 96), spacing_mm=SPACING_MM)


@pytest.fixture
def widget_with_scan(make_napari_viewer, small_phantom):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(small_phantom.image, "phantom")
    viewer.add_image(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.preset_combo.setCurrentText("Cardiac phantom (sample data)")
    yield viewer, widget
    widget.runner.shutdown()


def _paint(layer, truth, slices=LABELLED):
    for z in slices:
        layer.data[z] = truth[z]
    layer.events.data()


def _wait_done(qtbot, widget, timeout_ms=600_000):
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=timeout_ms)


def test_full_loop_on_the_phantom(widget_with_scan, small_phantom, qtbot, tmp_path):
    viewer, widget = widget_with_scan
    annotation = widget.new_annotation_layer()
    assert annotation is not None
    assert np.allclose(annotation.scale, viewer.layers["phantom"].scale)
    _paint(annotation, small_phantom.labels.array)
    widget._update_slice_count()
    assert widget.slice_count.text().startswith("2 z (axial) slice(s) (16, 32)")

    widget.steps_spin.setValue(300)
    progress = []
    widget.runner.job_event.connect(lambda e: progress.append(e))
    assert widget.start()
    assert widget.start_button.text() == "Stop"
    _wait_done(qtbot, widget)

    assert any(isinstance(e, Progress) for e in progress)
    done = [e for e in progress if isinstance(e, Done)]
    assert len(done) == 1 and not done[0].cancelled
    prediction = viewer.layers["phantom prediction"]
    assert widget.selected_labels() is annotation  # the prediction does not replace it
    assert "Mark slice empty" in widget.status.text()  # the next step where it is wrong
    image = viewer.layers["phantom"]
    assert np.allclose(prediction.scale, image.scale)
    assert np.allclose(prediction.translate, image.translate)
    assert np.allclose(
        prediction.metadata[METADATA_KEY]["affine"], image.metadata[METADATA_KEY]["affine"]
    )
    unlabelled = [z for z in range(small_phantom.labels.shape[0]) if z not in LABELLED]
    pred = np.asarray(prediction.data)
    results = class_metrics(pred[unlabelled], small_phantom.labels.array[unlabelled], SPACING_MM)
    mean_dice = float(np.mean([r.dice for r in results]))
    assert mean_dice > 0.85, [(r.name, round(r.dice, 3)) for r in results]

    out = widget.export_mask(tmp_path / "mask.nii.gz")
    assert out is not None
    saved = nib.load(out)
    assert np.allclose(saved.affine, small_phantom.image.grid.affine, atol=1e-4)
    assert np.array_equal(small_phantom.image.to_file_grid(pred), np.asarray(saved.dataobj))

    model_path = widget.save_model(tmp_path / "phantom-model.safetensors")
    assert load_checkpoint(model_path).card.class_names[1] == small_phantom.classes[1].name
    assert load_optimizer_state(model_path) is None  # weights and card only
    assert model_path.stat().st_size < done[0].checkpoint.stat().st_size / 2
    assert widget.start_button.text() == "Start"


def test_stop_keeps_the_model_so_far_and_predicts_with_it(widget_with_scan, small_phantom, qtbot):
    viewer, widget = widget_with_scan
    _paint(widget.new_annotation_layer(), small_phantom.labels.array)
    widget.steps_spin.setValue(100_000)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start()
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in events), timeout=300_000)
    widget.stop()
    assert widget.start_button.text() == "Cancel prediction"
    _wait_done(qtbot, widget)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and done[0].cancelled
    assert done[0].summary["steps_done"] < 100_000
    load_checkpoint(done[0].checkpoint)  # complete, loadable
    assert "phantom prediction" in viewer.layers


def test_closing_the_viewer_stops_the_job(make_napari_viewer, small_phantom, qtbot):
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(small_phantom.image, "phantom")
    viewer.add_image(data, **kwargs)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    _paint(widget.new_annotation_layer(), small_phantom.labels.array)
    widget.steps_spin.setValue(100_000)
    events = []
    widget.runner.job_event.connect(events.append)
    widget.start()
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in events), timeout=300_000)
    process = widget.runner._process
    widget._shutdown()  # what the window's destroyed / aboutToQuit signals call
    assert not widget.runner.is_running
    assert not process.is_alive()


def test_error_paths_notify_and_leave_the_widget_usable(
    widget_with_scan, small_phantom, qtbot, tmp_path
):
    viewer, widget = widget_with_scan

    # no annotation layer
    messages = notifications(widget.start)
    assert any("New annotation layer" in m for m in messages)

    # no labelled slice
    annotation = widget.new_annotation_layer()
    messages = notifications(widget.start)
    assert any("No labelled slice" in m for m in messages)

    # a labels layer that does not match the scan
    viewer.add_labels(np.ones((3, 4, 5), np.uint8), name="wrong shape")
    widget.labels_combo.setCurrentText("wrong shape")
    messages = notifications(widget.start)
    assert any("has shape (3, 4, 5)" in m for m in messages)

    # a checkpoint that is really a pickle
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    widget.add_model_file(bad)
    failures = []
    widget.runner.job_failed.connect(failures.append)
    messages = notifications(
        lambda: (widget.predict_with_selected_model(), _wait_done(qtbot, widget))
    )
    assert failures and failures[0].user_error
    assert any("pickle" in m.lower() for m in messages)

    # no image at all
    viewer.layers.remove("phantom")
    messages = notifications(widget.start)
    assert any("Choose a scan" in m for m in messages)

    # ...and after all that, the widget still works
    assert widget.start_button.isEnabled() and widget.start_button.text() == "Start"
    assert not widget.runner.is_running
    assert annotation in viewer.layers


def test_second_start_is_refused_while_running(widget_with_scan, small_phantom, qtbot):
    _, widget = widget_with_scan
    _paint(widget.new_annotation_layer(), small_phantom.labels.array)
    widget.steps_spin.setValue(100_000)
    assert widget.start()
    messages = notifications(lambda: widget.start() or widget.predict_with_selected_model())
    assert any("already running" in m for m in messages)
    widget.runner.shutdown()


def test_predicting_into_the_prediction_layer_is_undoable(
    widget_with_scan, small_phantom, qtbot, tmp_path
):
    from napari_fewlabel.train.finetune import FinetuneJob, run

    viewer, widget = widget_with_scan
    painted = np.zeros_like(small_phantom.labels.array)
    painted[list(LABELLED)] = small_phantom.labels.array[list(LABELLED)]
    models = []
    for steps, name in ((2, "early"), (20, "later")):
        job = FinetuneJob(
            image=small_phantom.image,
            labels=painted,
            out=tmp_path / f"{name}.safetensors",
            classes=small_phantom.classes,
            steps=steps,
            device="cpu",
        )
        models.append(next(e for e in run(job) if isinstance(e, Done)).checkpoint)

    widget.add_model_file(models[0])
    assert widget.predict_with_selected_model()
    _wait_done(qtbot, widget)
    layer = viewer.layers["phantom prediction"]
    first = np.array(layer.data, copy=True)

    widget.add_model_file(models[1])
    assert widget.predict_with_selected_model()
    _wait_done(qtbot, widget)
    assert viewer.layers["phantom prediction"] is layer  # updated, not duplicated
    second = np.array(layer.data, copy=True)
    assert not np.array_equal(first, second)
    layer.undo()
    assert np.array_equal(np.asarray(layer.data), first)


def test_sample_data_opens_with_its_truth_hidden(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "cardiac_ct")
    image, truth = layers
    assert image.metadata[METADATA_KEY]["modality"] == "CT"
    assert truth.visible is False
    assert truth.data.shape == image.data.shape
    assert set(np.unique(truth.data)) == {0, 1, 2, 3, 4, 5}


def test_the_event_loop_keeps_running_while_training(
    widget_with_scan, small_phantom, qtbot, record_property
):
    """A QTimer probe ticks every 10 ms while the widget trains; report the longest gap.

    The figure is reported, not asserted (timings belong in benchmarks/gui_responsiveness.py);
    what is asserted is that the event loop went on turning during training at all.
    """
    from qtpy.QtCore import QElapsedTimer, QTimer

    _, widget = widget_with_scan
    _paint(widget.new_annotation_layer(), small_phantom.labels.array)
    widget.steps_spin.setValue(40)
    clock = QElapsedTimer()
    ticks: list[float] = []
    probe = QTimer()
    probe.setInterval(10)
    probe.timeout.connect(lambda: ticks.append(clock.nsecsElapsed() / 1e6))
    steps_seen: list[int] = []
    widget.runner.job_event.connect(
        lambda e: steps_seen.append(e.step) if isinstance(e, Progress) else None
    )
    clock.start()
    probe.start()
    assert widget.start()
    _wait_done(qtbot, widget)
    probe.stop()
    assert steps_seen and steps_seen[-1] == 40
    gaps = np.diff(ticks) - 10.0
    record_property("longest_event_loop_gap_ms", round(float(gaps.max()), 1))
    print(f"longest event-loop gap while training: {gaps.max():.1f} ms over {len(ticks)} ticks")
    # Ticks arrived between the training steps, not only before and after the job.
    assert len(ticks) > 2 * len(steps_seen)


def test_pickers_follow_a_renamed_layer(widget_with_scan, small_phantom):
    viewer, widget = widget_with_scan
    annotation = widget.new_annotation_layer()
    _paint(annotation, small_phantom.labels.array)
    annotation.name = "annotation (2 slices)"  # what `fewlabel demo` does
    viewer.layers["phantom"].name = "heart MRI"
    assert widget.selected_labels() is annotation
    assert widget.selected_image() is viewer.layers["heart MRI"]
    assert widget.labels_combo.currentText() == "annotation (2 slices)"
    assert widget.image_combo.currentText() == "heart MRI"
    assert widget.slice_count.text().startswith("2 z (axial) slice(s)")


def test_marking_slices_empty_reaches_the_job(widget_with_scan, small_phantom):
    """'Mark slice empty' records the slice on screen; paint there is refused, before and after."""
    viewer, widget = widget_with_scan
    annotation = widget.new_annotation_layer()
    _paint(annotation, small_phantom.labels.array)
    viewer.dims.set_current_step(0, 3)
    messages = notifications(widget.toggle_empty_slice)
    assert any("Slice 3 (z (axial)) marked empty" in m for m in messages)
    viewer.dims.set_current_step(0, 44)
    assert widget.toggle_empty_slice()
    assert annotation.metadata["fewlabel_empty_slices"] == {"axis": 0, "slices": [3, 44]}
    assert "marked empty: 3, 44" in widget.slice_count.text()
    # A painted slice is labelled already.
    viewer.dims.set_current_step(0, LABELLED[0])
    messages = notifications(widget.toggle_empty_slice)
    assert any(f"Slice {LABELLED[0]} has painted voxels" in m for m in messages)
    # Pressing again on a marked slice unmarks it.
    viewer.dims.set_current_step(0, 44)
    assert widget.toggle_empty_slice()
    assert annotation.metadata["fewlabel_empty_slices"]["slices"] == [3]
    job = widget._build_job()
    assert job.empty_slices == (3,) and job.axis == 0
    # Another orientation on screen: refused, nothing changes.
    viewer.dims.order = (1, 0, 2)
    messages = notifications(widget.toggle_empty_slice)
    assert any("the view shows y (coronal) slices" in m for m in messages)
    assert annotation.metadata["fewlabel_empty_slices"]["slices"] == [3]
    viewer.dims.order = (0, 1, 2)
    # Painting on a marked slice later: Start says so and starts nothing.
    annotation.data[3, 40:44, 40:44] = 1
    annotation.events.data()
    messages = notifications(widget.start)
    assert any(
        "Slice(s) 3 along z (axial) are marked empty but have painted" in m for m in messages
    )
    assert not widget.runner.is_running


def test_a_saved_annotation_reopens_with_its_classes_and_marks(make_napari_viewer, tmp_path):
    """Save annotation -> close the layer -> File > Open: the same layer, classes and marks."""
    import real_data
    from napari_fewlabel.data.presets import CLASS_PRESETS, CUSTOM

    viewer = make_napari_viewer()
    (image,) = viewer.open(real_data.itk_t1(), plugin=PLUGIN)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget)
    try:
        widget.preset_combo.setCurrentText(CUSTOM)
        widget.custom_names.setText("tumour, oedema")
        annotation = widget.new_annotation_layer()
        annotation.data[10, 20:30, 20:30] = 1
        annotation.data[12, 5:9, 5:9] = 2
        annotation.events.data()
        viewer.dims.set_current_step(0, 3)
        assert widget.toggle_empty_slice()
        painted = np.array(annotation.data)
        out = tmp_path / "annotation.nii.gz"
        messages = notifications(lambda: widget.save_annotation(out))
        assert any("Annotation saved to" in m for m in messages)

        viewer.layers.remove(annotation)
        widget.preset_combo.setCurrentText(next(iter(CLASS_PRESETS)))  # forget the classes
        (reopened,) = viewer.open(out, plugin=PLUGIN)

        assert reopened._type_string == "labels"
        assert reopened.name == "annotation"
        assert np.array_equal(np.asarray(reopened.data), painted)
        np.testing.assert_allclose(reopened.scale, image.scale)
        np.testing.assert_allclose(reopened.translate, image.translate)
        assert reopened.metadata["fewlabel_empty_slices"] == {"axis": 0, "slices": [3]}
        assert widget.selected_labels() is reopened
        assert widget.custom_names.text() == "tumour, oedema"
        assert "marked empty: 3" in widget.slice_count.text()
        job = widget._build_job()
        assert job.empty_slices == (3,) and job.axis == 0
        assert [c.name for c in job.classes] == ["background", "tumour", "oedema"]
    finally:
        widget.runner.shutdown()


def test_saving_an_annotation_without_a_layer_or_on_a_bad_path_notifies(
    widget_with_scan, small_phantom, tmp_path
):
    _, widget = widget_with_scan
    messages = notifications(lambda: widget.save_annotation(tmp_path / "a.nii.gz"))
    assert any("No annotation layer to save" in m for m in messages)
    widget.new_annotation_layer()
    messages = notifications(lambda: widget.save_annotation(tmp_path / "a.png"))
    assert any("give a name ending in .nii.gz" in m for m in messages)
    assert list(tmp_path.iterdir()) == []


def test_label_next_shows_the_unlabelled_slices_the_model_is_least_sure_of(
    widget_with_scan, small_phantom, qtbot, tmp_path
):
    """Label next: the top-ranked unlabelled slice, in its orientation; again: the next one."""
    from napari_fewlabel.infer.suggest import suggest_slices
    from napari_fewlabel.train.finetune import FinetuneJob, run

    viewer, widget = widget_with_scan
    messages = notifications(widget.label_next)
    assert any("No model to ask yet" in m for m in messages)
    assert not widget.runner.is_running

    annotation = widget.new_annotation_layer()
    _paint(annotation, small_phantom.labels.array)
    viewer.dims.set_current_step(0, 3)
    assert widget.toggle_empty_slice()
    job = FinetuneJob(
        image=small_phantom.image,
        labels=np.asarray(annotation.data).copy(),
        out=tmp_path / "model.safetensors",
        classes=small_phantom.classes,
        steps=20,
        device="cpu",
    )
    checkpoint = next(e for e in run(job) if isinstance(e, Done)).checkpoint
    expected = suggest_slices(
        load_checkpoint(checkpoint), small_phantom.image, exclude=(*LABELLED, 3), device="cpu"
    )
    assert len(expected) == 5

    widget.add_model_file(checkpoint)
    viewer.dims.order = (1, 0, 2)  # a coronal view: Label next turns it back to axial
    assert widget.label_next()
    _wait_done(qtbot, widget)
    assert widget._slice_on_screen() == (0, expected[0].index)
    assert expected[0].index not in (*LABELLED, 3)
    assert f"Label slice {expected[0].index} (z (axial)) next: rank 1 of 5" in widget.status.text()
    assert viewer.layers.selection.active is annotation

    # Painting the suggested slice and pressing again steps to the next one, no new ranking.
    annotation.data[expected[0].index, 40:44, 40:44] = 1
    annotation.events.data()
    assert widget.label_next()
    assert not widget.runner.is_running
    assert widget._slice_on_screen() == (0, expected[1].index)
    assert "rank 2 of 5" in widget.status.text()


def test_refine_learns_from_a_corrected_slice_and_keeps_undo(
    widget_with_scan, small_phantom, qtbot
):
    """Correct one slice of the prediction, Refine: it becomes labelled, the prediction there
    moves toward the correction, the earlier prediction is one Ctrl+Z away."""
    from napari_fewlabel.models.checkpoint import read_card

    viewer, widget = widget_with_scan
    truth = small_phantom.labels.array
    messages = notifications(widget.refine)
    assert any("Nothing to refine yet" in m for m in messages)

    annotation = widget.new_annotation_layer()
    _paint(annotation, truth)
    widget.steps_spin.setValue(50)
    assert widget.start()
    _wait_done(qtbot, widget)
    first_model = widget._checkpoint
    prediction = viewer.layers["phantom prediction"]
    messages = notifications(widget.refine)  # nothing corrected, nothing painted
    assert any("Nothing new to learn from" in m for m in messages)
    assert not widget.runner.is_running

    # The user corrects the worst unlabelled slice with a brush (an undoable edit).
    before = np.array(prediction.data, copy=True)
    errors = [(before[z] != truth[z]).sum() if z not in LABELLED else -1 for z in range(48)]
    z = int(np.argmax(errors))
    wrong = np.nonzero(before[z] != truth[z])
    prediction.data_setitem((np.full_like(wrong[0], z), *wrong), truth[z][wrong])
    corrected = np.array(prediction.data, copy=True)

    assert widget.refine()
    _wait_done(qtbot, widget)
    assert np.array_equal(np.asarray(annotation.data)[z], truth[z])  # now a labelled slice
    card = read_card(widget._checkpoint)
    assert widget._checkpoint != first_model and first_model.exists()  # the earlier model kept
    assert card.training["steps_planned"] == 10  # a fifth of the 50 steps
    assert first_model.name in card.training["started_from"]
    assert z in card.training["data"]["labelled_slices"]
    after = np.asarray(prediction.data)
    assert (after[z] != truth[z]).sum() < errors[z]
    prediction.undo()
    assert np.array_equal(np.asarray(prediction.data), corrected)


def test_live_preview_follows_the_slice_on_screen_and_goes_when_training_ends(
    widget_with_scan, small_phantom, qtbot
):
    """While training runs, "<scan> preview" shows the slice on screen and its neighbours
    as the model of the moment labels them; it follows the view, never becomes the
    annotation, and is gone once the prediction arrives."""
    viewer, widget = widget_with_scan
    annotation = widget.new_annotation_layer()
    _paint(annotation, small_phantom.labels.array)
    widget.steps_spin.setValue(100_000)
    widget.preview_every_s = 0.0
    previews = []
    widget.runner.job_event.connect(
        lambda e: previews.append(e) if isinstance(e, Preview) else None
    )
    viewer.dims.set_current_step(0, 24)
    assert widget.start()
    # Added with the click, empty: adding a layer later would freeze the window mid-run.
    assert not np.asarray(viewer.layers["phantom preview"].data).any()
    assert viewer.layers.selection.active is annotation
    # The widget handles each event before this test's slot sees it: previews[-1] is shown.
    qtbot.waitUntil(lambda: bool(previews) and previews[-1].labels.any(), timeout=300_000)
    layer = viewer.layers["phantom preview"]
    shown = np.asarray(layer.data)
    assert (previews[-1].axis, previews[-1].start) == (0, 23)
    assert np.array_equal(shown[23:26], previews[-1].labels)
    assert not shown[:23].any() and not shown[26:].any()
    assert widget.selected_labels() is annotation
    assert viewer.layers.selection.active is annotation
    assert widget.labels_combo.findText("phantom preview") == -1

    seen = len(previews)
    viewer.dims.set_current_step(0, 10)
    qtbot.waitUntil(lambda: any(p.start == 9 for p in previews[seen:]), timeout=120_000)
    shown = np.asarray(layer.data)
    assert np.array_equal(shown[9:12], previews[-1].labels)
    assert not shown[23:26].any()  # the slices shown before are cleared

    widget.stop()
    _wait_done(qtbot, widget)
    assert "phantom preview" not in viewer.layers
    assert "phantom prediction" in viewer.layers
