from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import load_checkpoint, load_optimizer_state, read_card
from napari_fewlabel.train.events import Done, Notice, Progress
from napari_fewlabel.train.finetune import (
    BatchSizes,
    FinetuneSettings,
    run,
    step_with_oom_fallback,
)


def _events(job, cancel=None):
    return list(run(job, cancel))


def test_a_run_yields_progress_then_one_done_with_a_complete_checkpoint(make_job, tiny_case):
    events = _events(make_job(steps=4))
    assert isinstance(events[-1], Done) and not events[-1].cancelled
    assert sum(isinstance(e, Done) for e in events) == 1
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert all(p.total == 4 and p.device.startswith("cpu") for p in progress)
    assert all(math.isfinite(p.losses["total"]) for p in progress)
    assert all(p.val_dice is None for p in progress)  # no label is held out by default
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("Slice axis 0" in m for m in notices)
    assert any("2 labelled slice(s) for training" in m and "0 held out" in m for m in notices)
    assert "stream_agreement" in events[-1].summary

    done = events[-1]
    card = load_checkpoint(done.checkpoint).card
    assert card.class_names == tuple(c.name for c in tiny_case.classes)
    assert card.slice_axis == 0
    assert card.training["steps_done"] == 4
    assert card.training["data"]["labelled_slices"] == list(tiny_case.labelled)
    assert card.training["data"]["held_out_slices"] == []
    assert card.training["settings"]["confidence_threshold"] == 0.9
    assert card.training["paper_faithful"] is False
    assert "2.5D" in " ".join(card.training["differences_from_paper"])
    assert card.modality == "MR" and card.normalization.method == "percentile_zscore"
    assert done.summary["steps_done"] == 4


def test_held_out_slices_give_a_validation_dice_then_join_training(make_job, tiny_settings):
    settings = replace(tiny_settings, validation_min_labelled=2, validation_rejoin_at=0.5)
    events = _events(make_job(steps=4, settings=settings))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[1].val_dice is not None and 0 <= progress[1].val_dice <= 1
    assert progress[3].val_dice is None  # slice 11 trains from step 3 on
    assert any("join training" in e.message for e in events if isinstance(e, Notice))
    done = events[-1]
    assert done.summary["held_out_slices"] == [11]
    assert done.summary["val_dice"] == progress[1].val_dice


def test_a_structure_seen_on_one_slice_only_is_never_held_out(make_job, tiny_case, tiny_settings):
    painted = np.zeros_like(tiny_case.truth.array)
    painted[[3, 11]] = tiny_case.truth.array[[3, 11]]  # atrium and aorta only on slice 11
    settings = replace(tiny_settings, validation_min_labelled=2)
    events = _events(make_job(labels=painted, steps=2, settings=settings))
    assert any("appears only on the slice" in e.message for e in events if isinstance(e, Notice))
    assert events[-1].summary["held_out_slices"] == []


def test_paper_settings_are_recorded_as_faithful(make_job):
    from napari_fewlabel.models.unet2d import UNetConfig

    job = make_job(
        steps=2,
        settings=replace(FinetuneSettings.paper(), batch_labelled=2, batch_unlabelled=2),
        architecture=UNetConfig(in_slices=1, widths=(8, 16, 32), full_res_width=4),
    )
    done = _events(job)[-1]
    training = read_card(done.checkpoint).training
    assert training["paper_faithful"] is True
    assert training["differences_from_paper"] == []
    assert FinetuneSettings.from_dict(training["settings"]) == job.settings


def test_labels_above_the_class_count_are_refused(make_job, tiny_case):
    bad = tiny_case.labels.array.copy()
    bad[6, 0, 0] = 9
    with pytest.raises(FewLabelError, match=r"value 9.*only 6 classes"):
        _events(make_job(labels=bad))


def test_no_labelled_slice_is_refused(make_job, tiny_case):
    with pytest.raises(FewLabelError, match="No labelled slice"):
        _events(make_job(labels=np.zeros(tiny_case.image.shape, np.uint8)))


def test_shape_and_geometry_mismatches_are_refused(make_job, tiny_case):
    with pytest.raises(FewLabelError, match="differs from the image shape"):
        _events(make_job(labels=tiny_case.labels.array[:-1]))
    shifted = Volume.from_array(
        tiny_case.labels.array, (4.0, 3.0, 3.0), modality="MR", origin_lps_mm=(0.0, 0.0, 10.0)
    )
    with pytest.raises(FewLabelError, match="not on the same grid"):
        _events(make_job(labels=shifted))


def test_non_integer_and_negative_labels_are_refused(make_job, tiny_case):
    fractional = tiny_case.labels.array.astype(np.float32)
    fractional[6, 0, 0] = 0.5
    with pytest.raises(FewLabelError, match="non-integer"):
        _events(make_job(labels=fractional))
    negative = tiny_case.labels.array.astype(np.int16)
    negative[6, 0, 0] = -1
    with pytest.raises(FewLabelError, match="negative"):
        _events(make_job(labels=negative))


def test_nan_voxels_are_reported_and_training_stays_finite(make_job, tiny_case):
    image = tiny_case.image.array.copy()
    image[:, :4, :4] = np.nan
    image[3, 10, 10] = np.inf
    events = _events(make_job(image=tiny_case.image.with_array(image), steps=2))
    warnings = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert any("257 image voxels are NaN or Inf" in m for m in warnings)
    assert all(math.isfinite(e.losses["total"]) for e in events if isinstance(e, Progress))


def test_every_slice_labelled_trains_supervised_and_says_so(make_job):
    rng = np.random.default_rng(0)
    image = Volume.from_array(rng.normal(size=(6, 32, 32)).astype(np.float32), modality="MR")
    labels = (image.array > 0).astype(np.uint8)  # every slice has foreground
    events = _events(make_job(image=image, labels=labels, classes=None, steps=2))
    assert any("Every slice is labelled" in e.message for e in events if isinstance(e, Notice))
    card = read_card(events[-1].checkpoint)
    assert card.training["method"].startswith("two-stream supervised")
    assert card.class_names == ("background", "class 1")
    assert all("cps" not in e.losses for e in events if isinstance(e, Progress))


def test_cancel_leaves_a_loadable_checkpoint_and_resume_continues_the_count(make_job, tmp_path):
    cancel = threading.Event()
    job = make_job(steps=4)
    seen = []
    for event in run(job, cancel):
        seen.append(event)
        if isinstance(event, Progress) and event.step == 2:
            cancel.set()
    done = seen[-1]
    assert isinstance(done, Done) and done.cancelled
    assert [e.step for e in seen if isinstance(e, Progress)] == [1, 2]
    model = load_checkpoint(done.checkpoint)
    assert model.card.training["steps_done"] == 2

    resumed = make_job(steps=4, resume_from=done.checkpoint, out=tmp_path / "resumed.safetensors")
    events = _events(resumed)
    assert any("Resuming" in e.message for e in events if isinstance(e, Notice))
    assert [e.step for e in events if isinstance(e, Progress)] == [3, 4]
    final = events[-1]
    assert final.summary["steps_done"] == 4
    optimizer = load_optimizer_state(final.checkpoint)
    assert optimizer is not None
    assert float(next(iter(optimizer["state"].values()))["step"]) == 4.0  # Adam moments continued


def test_time_budget_stops_before_the_step_count(make_job):
    events = _events(make_job(steps=10_000, time_budget_s=0.01))
    done = events[-1]
    assert isinstance(done, Done)
    assert 1 <= done.summary["steps_done"] < 10_000
    assert read_card(done.checkpoint).training["steps_done"] == done.summary["steps_done"]


def test_start_from_a_model_with_other_classes_reuses_its_encoder(make_job, tiny_case, tmp_path):
    first = _events(make_job(steps=2))[-1].checkpoint
    two_class = (tiny_case.labels.array == 2).astype(np.uint8)
    job = make_job(
        labels=two_class,
        classes=named_classes(["background", "myocardium"]),
        model=first,
        steps=1,
        out=tmp_path / "second.safetensors",
    )
    events = _events(job)
    assert any("(encoder)" in e.message for e in events if isinstance(e, Notice))
    second = load_checkpoint(events[-1].checkpoint)
    assert len(second.card.classes) == 2
    assert second.card.training["started_from"].endswith("(encoder)")
    first_encoder = load_checkpoint(first).network.encoder.state_dict()
    # One step moved the weights a little from the source encoder, not to a random init.
    drift = [
        float((second.network.encoder.state_dict()[k] - v).abs().max())
        for k, v in first_encoder.items()
        if v.dtype.is_floating_point
    ]
    assert max(drift) < 0.05


def test_start_from_a_model_with_the_same_classes_reuses_everything(make_job, tmp_path):
    first = _events(make_job(steps=2))[-1].checkpoint
    events = _events(make_job(classes=None, model=first, steps=1, out=tmp_path / "b.safetensors"))
    assert any("(all weights)" in e.message for e in events if isinstance(e, Notice))
    assert len(load_checkpoint(events[-1].checkpoint).card.classes) == 6


def test_bad_output_path_is_refused_before_training(make_job, tmp_path):
    with pytest.raises(FewLabelError, match=r"\.safetensors"):
        _events(make_job(out=tmp_path / "model.pt"))
    with pytest.raises(FewLabelError, match="does not exist"):
        _events(make_job(out=tmp_path / "missing" / "model.safetensors"))


# ------------------------------------------------------------- out of memory
def _oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_halves_the_batch_and_says_so():
    tried = []

    def step(batch: BatchSizes) -> str:
        tried.append(batch)
        if batch.labelled + batch.unlabelled > 3:
            raise _oom()
        return "ok"

    result, batch, notices = step_with_oom_fallback(step, BatchSizes(4, 4), advice="x")
    assert result == "ok"
    assert tried == [BatchSizes(4, 4), BatchSizes(2, 2), BatchSizes(1, 1)]
    assert batch == BatchSizes(1, 1)
    assert len(notices) == 2 and "continuing with 2+2" in notices[0].message


def test_out_of_memory_at_batch_one_says_what_to_change():
    def step(batch: BatchSizes) -> None:
        raise _oom()

    with pytest.raises(FewLabelError, match=r"even with one labelled.*--max-input-side"):
        step_with_oom_fallback(step, BatchSizes(2, 1), advice="use a smaller --max-input-side")


def test_settings_validation_and_paper_differences():
    assert FinetuneSettings.paper().differences_from_paper(in_slices=1) == []
    assert len(FinetuneSettings().differences_from_paper(in_slices=3)) >= 3
    with pytest.raises(FewLabelError, match="confidence_threshold"):
        FinetuneSettings(confidence_threshold=1.5)
    with pytest.raises(FewLabelError, match="Batch sizes"):
        FinetuneSettings(batch_labelled=0)


@pytest.fixture
def install_default_encoder(make_job, tmp_path, monkeypatch):
    """Install a pretrained encoder (for the jobs' network) under the default name."""
    from napari_fewlabel.data.classes import default_classes
    from napari_fewlabel.data.normalization import NormalizationConfig
    from napari_fewlabel.models import registry
    from napari_fewlabel.models.checkpoint import (
        ENCODER_ONLY_KEY,
        ModelCard,
        save_encoder_checkpoint,
    )
    from napari_fewlabel.models.unet2d import Encoder

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(registry, "SHIPPED_MODEL_DIR", shipped)
    monkeypatch.setattr(registry, "user_model_dir", lambda: tmp_path / "user")
    path = shipped / f"{registry.DEFAULT_ENCODER}.safetensors"
    arch = make_job().architecture

    def install(modality):
        card = ModelCard(
            architecture={**arch.to_dict(), ENCODER_ONLY_KEY: True},
            classes=default_classes(2),
            modality=modality,
            normalization=NormalizationConfig.for_modality(modality),
            input_size=(64, 64),
        )
        torch.manual_seed(1)
        save_encoder_checkpoint(path, Encoder(arch), card)
        return path

    return install


def _started_from(events):
    return load_checkpoint(events[-1].checkpoint).card.training["started_from"]


def test_default_start_is_the_shipped_encoder_when_it_suits_the_scan(
    make_job, install_default_encoder
):
    # A CT-only encoder and the MR phantom: random start.
    install_default_encoder("CT")
    events = _events(make_job(steps=1))
    assert _started_from(events) == "random initialisation"
    assert not _unfit_warnings(events)  # not for this modality: nothing to warn about
    # Pretrained on MR and CT: serves the MR scan, which is still normalised as MR
    # (pretraining normalised each scan by its own modality).
    path = install_default_encoder("unknown")
    events = _events(make_job(steps=1))
    assert _started_from(events) == f"{path.name} (encoder)"
    assert read_card(events[-1].checkpoint).normalization.method == "percentile_zscore"
    # "random" asks for a random start even so; so does another architecture.
    assert _started_from(_events(make_job(steps=1, model="random"))) == "random initialisation"
    other = replace(make_job().architecture, widths=(8, 16))
    events = _events(make_job(steps=1, architecture=other))
    assert _started_from(events) == "random initialisation"
    # ... and says so, since the user may have expected their encoder to be used.
    (warning,) = _unfit_warnings(events)
    assert path.name in warning.message and "fewlabel pretrain" in warning.message


def _unfit_warnings(events):
    return [
        e
        for e in events
        if isinstance(e, Notice) and e.level == "warning" and "another network" in e.message
    ]


def test_a_pretrained_encoder_can_train_at_a_lower_rate_than_the_decoders():
    from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
    from napari_fewlabel.train.finetune import _parameter_groups

    network = TwoStreamUNet(UNetConfig(in_slices=1, widths=(8, 16), full_res_width=4))
    settings = FinetuneSettings(encoder_lr_scale=0.1)
    encoder, rest = _parameter_groups(network, settings, pretrained=True)
    assert encoder["lr_scale"] == 0.1 and rest["lr_scale"] == 1.0
    assert {id(p) for p in encoder["params"]} == {id(p) for p in network.encoder.parameters()}
    assert len(encoder["params"]) + len(rest["params"]) == len(list(network.parameters()))
    # A random start has nothing to keep: one group at the full rate.
    (only,) = _parameter_groups(network, settings, pretrained=False)
    assert only["lr_scale"] == 1.0 and len(only["params"]) == len(list(network.parameters()))
    with pytest.raises(FewLabelError, match="encoder_lr_scale"):
        FinetuneSettings(encoder_lr_scale=0.0)


def test_the_encoder_rate_scale_reaches_the_optimizer(make_job, tmp_path, monkeypatch):
    """A run from a trained start steps the encoder at the scaled learning rate."""
    seen: list[list[float]] = []
    first = list(run(make_job(steps=2)))[-1]  # a trained model to start from
    job = make_job(
        steps=2,
        model=str(first.checkpoint),
        out=tmp_path / "second.safetensors",
        settings=replace(make_job().settings, encoder_lr_scale=0.25),
    )
    real_adamw = torch.optim.AdamW

    class Recording(real_adamw):  # type: ignore[misc,valid-type]
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    done = list(run(job))[-1]
    assert isinstance(done, Done)
    assert seen and all(len(lrs) == 2 for lrs in seen)
    assert all(abs(enc - 0.25 * dec) < 1e-12 for enc, dec in seen)


def _encoder_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint).network.encoder.state_dict()


def test_a_trained_encoder_stays_frozen_for_the_asked_fraction_of_steps(make_job, tmp_path):
    """LP-FT: the decoders learn on the trained encoder's features first; a random start is never frozen."""
    first = list(run(make_job(steps=2)))[-1]
    start = _encoder_weights(first.checkpoint)

    def from_first(frozen_for: float, name: str, model: str | None = None):
        job = make_job(
            steps=4,
            model=model or str(first.checkpoint),
            out=tmp_path / f"{name}.safetensors",
            settings=replace(make_job().settings, encoder_frozen_for=frozen_for),
        )
        done = list(run(job))[-1]
        assert (
            isinstance(done, Done)
            and read_card(done.checkpoint).training["settings"]["encoder_frozen_for"] == frozen_for
        )
        return done.checkpoint

    # Frozen for every step (0.9 of 4 steps): the encoder is exactly the start's ...
    frozen = from_first(0.9, "frozen")
    assert all(torch.equal(start[k], v) for k, v in _encoder_weights(frozen).items())
    # ... while the decoders trained on it.
    before = load_checkpoint(first.checkpoint).network.state_dict()
    after = load_checkpoint(frozen).network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after if not k.startswith("encoder."))
    # Frozen for half the steps: it trains after that.
    half = from_first(0.5, "half")
    assert any(not torch.equal(start[k], v) for k, v in _encoder_weights(half).items())
    # A random start has no features to keep: the setting changes nothing.
    plain = _encoder_weights(from_first(0.0, "random-plain", model="random"))
    asked = _encoder_weights(from_first(0.9, "random-frozen", model="random"))
    assert all(torch.equal(plain[k], v) for k, v in asked.items())
    with pytest.raises(FewLabelError, match="encoder_frozen_for"):
        FinetuneSettings(encoder_frozen_for=1.0)


def test_a_slice_marked_empty_is_trained_as_background(make_job, tiny_case, tmp_path):
    """Marking a slice empty is a label: here slice 8, which holds the heart, is
    marked empty on purpose, and the model learns to leave it blank."""
    from napari_fewlabel.infer.predict import predict_volume

    assert tiny_case.truth.array[8].any()

    # The labelled plane only: this tiny network learns the heart within 120 steps there,
    # while with the planes across it the labelled plane gets half of them.
    settings = replace(make_job().settings, planes="labelled")

    def foreground_on_slice_8(**changes):
        job = make_job(steps=120, out=tmp_path / "m.safetensors", settings=settings, **changes)
        done = list(run(job))[-1]
        model = load_checkpoint(done.checkpoint)
        return done, int(
            (predict_volume(model, tiny_case.image, axis=0, device="cpu")[8] > 0).sum()
        )

    _, unmarked = foreground_on_slice_8()
    events = _events(make_job(steps=1, empty_slices=(8,)))
    assert any("(1 of them marked empty)" in e.message for e in events if isinstance(e, Notice))
    done, marked = foreground_on_slice_8(empty_slices=(8,))
    # Unmarked, the model finds about half the heart there (418 voxels); marked, little or none.
    assert unmarked > 100 and marked < unmarked / 4, (unmarked, marked)
    data = read_card(done.checkpoint).training["data"]
    assert data["labelled_slices"] == list(tiny_case.labelled) and data["empty_slices"] == [8]
    assert data["unlabelled_slices"] == tiny_case.image.shape[0] - 3
    with pytest.raises(FewLabelError, match="marked empty but have painted"):
        list(run(make_job(empty_slices=(tiny_case.labelled[0],))))


def test_slices_marked_empty_take_at_most_their_share_of_the_labelled_draws(make_job, tiny_case):
    from napari_fewlabel.train.finetune import labelled_draw_probabilities

    # One painted slice beside two marked ones: capped at half, the painted one gets half.
    p = labelled_draw_probabilities(np.array([False, True, True]), 0.5)
    assert p is not None and np.allclose(p, [0.5, 0.25, 0.25])
    p = labelled_draw_probabilities(np.array([True, False, False, True, False]), 0.2)
    assert p is not None and np.allclose(p, [0.1, 0.8 / 3, 0.8 / 3, 0.1, 0.8 / 3])
    # Equal draws already within the share, no marks, or nothing painted: equal draws.
    assert labelled_draw_probabilities(np.array([False, False, False, True]), 0.5) is None
    assert labelled_draw_probabilities(np.array([False, False]), 0.1) is None
    assert labelled_draw_probabilities(np.array([True, True]), 0.1) is None
    assert labelled_draw_probabilities(np.array([False, True]), 1.0) is None
    # A real run with the cap binding (two painted slices, one marked) records it.
    job = make_job(steps=2, empty_slices=(8,))
    job = replace(job, settings=replace(job.settings, empty_share=0.2))
    done = _events(job)[-1]
    assert isinstance(done, Done)
    training = read_card(done.checkpoint).training
    assert training["settings"]["empty_share"] == 0.2
    with pytest.raises(FewLabelError, match="empty_share"):
        FinetuneSettings(empty_share=0.0)


def test_planes_auto_keeps_a_small_structure_on_the_painted_plane(make_job, tiny_case, tmp_path):
    """A 3x3 blob (0.2 % of its slices) beside a 40x40 organ trains on the painted plane
    only; the blob alone, or the organ alone, trains on the planes across too, and the
    card says which planes predict."""
    both = np.zeros(tiny_case.image.shape, dtype=np.uint8)
    both[[6, 11], 10:30, 10:30] = 1
    both[[6, 11], 40:43, 40:43] = 2
    auto = replace(make_job().settings, planes="auto")
    events = _events(
        make_job(
            steps=1,
            labels=both,
            classes=named_classes(["background", "organ", "blob"]),
            settings=auto,
        )
    )
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("blob covers 0.2% of the slices" in m for m in notices), notices
    assert read_card(events[-1].checkpoint).inference["planes"] == [0]

    alone = np.where(both == 2, 1, 0).astype(np.uint8)
    events = _events(
        make_job(
            steps=1,
            labels=alone,
            classes=named_classes(["background", "blob"]),
            settings=auto,
            out=tmp_path / "blob.safetensors",
        )
    )
    assert not any("covers" in e.message for e in events if isinstance(e, Notice))
    assert read_card(events[-1].checkpoint).inference["planes"] == [0, 1, 2]

    large = np.zeros(tiny_case.image.shape, dtype=np.uint8)
    large[[6, 11], 10:50, 10:50] = 1
    events = _events(
        make_job(
            steps=1,
            labels=large,
            classes=named_classes(["background", "organ"]),
            settings=auto,
            out=tmp_path / "organ.safetensors",
        )
    )
    assert any(
        "planes across the labelled slices" in e.message for e in events if isinstance(e, Notice)
    )
    card = read_card(events[-1].checkpoint)
    assert card.inference["planes"] == [0, 1, 2]
    assert len(card.inference["plane_weights"]) == 3


def test_a_model_of_another_modality_sees_the_scan_as_its_own_modality(make_job, tmp_path):
    # An MRI model, then fine-tuned on a CT phantom: the CT goes through the HU window.
    from napari_fewlabel.data.phantoms import cardiac_phantom

    mr_model = _events(make_job(steps=1, out=tmp_path / "mr.safetensors"))[-1].checkpoint
    ct = cardiac_phantom("CT", seed=1, shape=(16, 64, 64), spacing_mm=(4.0, 3.0, 3.0))
    painted = np.zeros_like(ct.labels.array)
    painted[8] = ct.labels.array[8]
    events = _events(
        make_job(
            image=ct.image,
            labels=ct.labels.with_array(painted),
            model=mr_model,
            steps=1,
            out=tmp_path / "ct.safetensors",
        )
    )
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("learnt MR, this scan is CT" in m and "HU window -300 to 400" in m for m in notes)
    card = read_card(events[-1].checkpoint)
    assert card.modality == "CT" and card.normalization.method == "ct_window"
    # The same modality keeps the start model's own normalisation (no notice).
    again = _events(make_job(model=mr_model, steps=1, out=tmp_path / "mr2.safetensors"))
    assert not any("learnt MR" in e.message for e in again if isinstance(e, Notice))
    assert read_card(again[-1].checkpoint).normalization == read_card(mr_model).normalization
