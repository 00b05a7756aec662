"""The "Adapt an MRI model to CT" widget in a real napari viewer (Xvfb), with real updates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.jobs import PredictionProgress
from napari_fewlabel.models.checkpoint import load_optimizer_state, read_card
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.napari._adapt_widget import CHOOSE, NO_CT_LABELS, AdaptWidget
from napari_fewlabel.napari._layers import PREDICTION_KEY, image_layer_data
from napari_fewlabel.train import finetune
from napari_fewlabel.train.events import Done, Notice, Progress
from notifications import notifications

pytestmark = pytest.mark.gui
SHAPE, SPACING = (16, 64, 64), (4.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def pair():
    return cardiac_phantom("MR", 0, SHAPE, SPACING), cardiac_phantom("CT", 1, SHAPE, SPACING)


@pytest.fixture(scope="module")
def mr_model(pair, tmp_path_factory) -> Path:
    """A small MRI model (a few supervised steps on the labelled MR phantom)."""
    mr, _ = pair
    out = tmp_path_factory.mktemp("source") / "mr.safetensors"
    job = finetune.FinetuneJob(
        image=mr.image,
        labels=mr.labels,
        out=out,
        classes=mr.classes,
        model="random",
        steps=4,
        device="cpu",
        settings=replace(finetune.FinetuneSettings.supervised(), batch_labelled=2),
        architecture=UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4),
        checkpoint_every_s=3600.0,
    )
    assert isinstance(list(finetune.run(job))[-1], Done)
    return out


@pytest.fixture
def viewer_and_widget(make_napari_viewer, pair):
    viewer = make_napari_viewer()
    mr, ct = pair
    for volume, name in ((mr.image, "mr"), (ct.image, "ct")):
        data, kwargs, _ = image_layer_data(volume, name)
        viewer.add_image(data, **kwargs)
    widget = AdaptWidget(viewer)
    viewer.window.add_dock_widget(widget)
    yield viewer, widget
    widget.runner.shutdown()


def test_scans_are_ticked_by_modality(viewer_and_widget, pair):
    viewer, widget = viewer_and_widget
    assert [layer.name for layer in widget._ticked(widget.target_list)] == ["ct"]
    assert [layer.name for layer in widget._ticked(widget.source_list)] == ["mr"]
    assert widget.predict_combo.currentText() == "ct"
    # A CT opened later comes ticked too; the user's unticking of "ct" is kept.
    widget.set_ticked("target", [])
    data, kwargs, _ = image_layer_data(pair[1].image, "ct 2")
    viewer.add_image(data, **kwargs)
    assert [layer.name for layer in widget._ticked(widget.target_list)] == ["ct 2"]
    assert widget.device_label.text().startswith("cpu")


def test_model_list_leaves_out_encoders_and_ct_models(viewer_and_widget):
    _, widget = viewer_and_widget
    names = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    # The shipped models are pretrained encoders: nothing to adapt.
    assert not any(name.endswith("-encoder") for name in names)
    assert names[0] == CHOOSE


def test_adapt_then_predict_the_ct(viewer_and_widget, mr_model, pair, qtbot, tmp_path):
    viewer, widget = viewer_and_widget
    widget.add_model_file(mr_model)
    assert "MR model" in widget.model_info.text()
    widget.steps_spin.setValue(3)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start()
    assert widget.start_button.text() == "Stop"
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)

    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert "wasserstein" in widget.plot.series()
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and not done[0].cancelled
    layer = viewer.layers["ct prediction (adapted)"]
    assert layer.metadata[PREDICTION_KEY]
    assert layer.data.shape == pair[1].image.shape
    assert np.allclose(layer.scale, viewer.layers["ct"].scale)
    assert set(np.unique(layer.data)) <= set(range(len(pair[1].classes)))
    assert widget.start_button.text() == "Start"

    saved = widget.save_model(tmp_path / "ct-model")
    assert saved == tmp_path / "ct-model.safetensors"
    card = read_card(saved)
    assert card.modality == "CT"
    assert Path(card.training["source_model"]["path"]).name == mr_model.name
    assert load_optimizer_state(saved) is None


def test_the_critic_choice_reaches_the_adapted_model(viewer_and_widget, mr_model, qtbot, tmp_path):
    viewer, widget = viewer_and_widget
    widget.add_model_file(mr_model)
    assert widget.critic_combo.currentData() == "clip"  # the paper's critic by default
    widget.critic_combo.setCurrentIndex(widget.critic_combo.findData("gp"))
    widget.steps_spin.setValue(2)
    assert widget.start()
    bar_at_progress = []
    widget.runner.job_event.connect(
        lambda e: (
            bar_at_progress.append((widget.progress.value(), widget.progress.maximum()))
            if isinstance(e, PredictionProgress)
            else 0
        )
    )
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)
    assert "ct prediction (adapted)" in viewer.layers
    # The CT's prediction moved the bar to its end; then the bar counts steps again.
    assert bar_at_progress and bar_at_progress[-1][0] == bar_at_progress[-1][1] > 0
    assert widget.progress.format() == "%v / %m steps"
    training = read_card(widget.save_model(tmp_path / "gp")).training
    settings = training["settings"]
    assert settings["objective"] == "gp" and settings["critic_updates"] == 5
    assert settings["critic_region"] == "whole"  # measured better than the regions found


def test_stop_keeps_the_adapted_model_and_predicts(viewer_and_widget, mr_model, qtbot):
    viewer, widget = viewer_and_widget
    widget.add_model_file(mr_model)
    widget.steps_spin.setValue(10_000)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start()
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in events), timeout=300_000)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=120_000)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and done[0].cancelled
    assert "ct prediction (adapted)" in viewer.layers
    assert widget.save_model_button.isEnabled()


def test_bad_choices_are_refused_with_a_notification(viewer_and_widget, mr_model):
    viewer, widget = viewer_and_widget
    messages = notifications(widget.start)
    assert any("Choose the source model" in m for m in messages)
    assert not widget.runner.is_running

    widget.add_model_file(mr_model)
    widget.set_ticked("target", [])
    messages = notifications(widget.start)
    assert any("Tick at least one CT scan" in m for m in messages)

    widget.set_ticked("target", [viewer.layers["mr"]])
    messages = notifications(widget.start)
    assert any("mr is MR, not CT" in m for m in messages)
    assert not widget.runner.is_running


def test_an_encoder_as_source_fails_in_the_job_with_a_notification(viewer_and_widget, qtbot):
    from napari_fewlabel.models.registry import resolve_model

    _, widget = viewer_and_widget
    widget.add_model_file(resolve_model("medmoco-encoder"))
    widget.steps_spin.setValue(3)
    failures = []
    widget.runner.job_failed.connect(failures.append)
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=120_000)
    assert len(failures) == 1 and failures[0].user_error
    assert widget.start_button.text() == "Start"


def test_painted_ct_slices_join_adaptation(viewer_and_widget, mr_model, pair, qtbot, tmp_path):
    viewer, widget = viewer_and_widget
    _, ct = pair
    widget.add_model_file(mr_model)
    assert widget.ct_labels_combo.currentText() == NO_CT_LABELS
    painted = np.zeros(ct.image.shape, dtype=np.uint8)
    painted[8] = ct.labels.array[8]
    viewer.add_labels(painted, name="ct labels", scale=viewer.layers["ct"].scale)
    widget.ct_labels_combo.setCurrentIndex(widget.ct_labels_combo.findText("ct labels"))
    widget.steps_spin.setValue(2)
    events = []
    widget.runner.job_event.connect(events.append)
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.runner.is_running, timeout=300_000)
    assert any(isinstance(e, Notice) and "1 painted CT slice(s) (8)" in e.message for e in events)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 1 and done[0].summary["verdict"] in widget.status.text()
    card = read_card(widget.save_model(tmp_path / "with-labels"))
    assert card.training["ct_labels_used"] is True and card.training["ct_labelled_slices"] == [8]
    # The prediction layer is not offered as CT labels.
    names = [widget.ct_labels_combo.itemText(i) for i in range(widget.ct_labels_combo.count())]
    assert "ct prediction (adapted)" not in names and "ct labels" in names


def test_ct_labels_of_another_shape_are_refused(viewer_and_widget, mr_model):
    viewer, widget = viewer_and_widget
    widget.add_model_file(mr_model)
    viewer.add_labels(np.ones((4, 8, 8), dtype=np.uint8), name="other")
    widget.ct_labels_combo.setCurrentIndex(widget.ct_labels_combo.findText("other"))
    messages = notifications(widget.start)
    assert any("The labels layer other is (4, 8, 8) voxels" in m for m in messages)
    assert not widget.runner.is_running
