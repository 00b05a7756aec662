"""MRI -> CT adaptation (train.adapt): what is frozen stays frozen, the critic stays clipped,
cancel/resume, the adapted model is an ordinary CT model, and it segments CT better."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io import Volume
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import (
    load_checkpoint,
    read_card,
    read_model_tensors,
    save_checkpoint,
)
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import adapt, adapt_check, finetune
from napari_fewlabel.train.device import precision_for
from napari_fewlabel.train.events import Done, Event, Notice, Progress

#: A network small enough that a step takes a few hundredths of a second.
TINY_NET = UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4)

SHAPE, SPACING = (16, 64, 64), (4.0, 3.0, 3.0)
#: Few, cheap updates: enough to exercise every code path.
QUICK = adapt.AdaptSettings(
    critic_updates=2, warmup_steps=1, batch_size=2, critic_width=8, dam_stages=2
)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    """A paired MR/CT phantom 'patient' (same anatomy, two appearances)."""
    return cardiac_phantom("MR", 0, SHAPE, SPACING), cardiac_phantom("CT", 0, SHAPE, SPACING)


@pytest.fixture(scope="module")
def source_model(pair: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MRI model trained supervised on every labelled slice of the MR phantom."""
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
        architecture=TINY_NET,
        checkpoint_every_s=3600.0,
    )
    events = list(finetune.run(job))
    assert isinstance(events[-1], Done)
    return out


@pytest.fixture
def make_job(
    pair: tuple[Any, Any], source_model: Path, tmp_path: Path
) -> Callable[..., adapt.AdaptJob]:
    mr, ct = pair

    def make(**changes: Any) -> adapt.AdaptJob:
        job = adapt.AdaptJob(
            source_model=source_model,
            target=(ct.image,),
            source=(mr.image,),
            out=tmp_path / "adapted.safetensors",
            steps=3,
            device="cpu",
            settings=QUICK,
            checkpoint_every_s=3600.0,
        )
        return replace(job, **changes)

    return make


def _run(job: adapt.AdaptJob, cancel: Any = None) -> list[Event]:
    events = list(adapt.run(job, cancel))
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    return events


def _split(path: Path, dam_stages: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = read_model_tensors(path)
    prefixes = adapt.dam_prefixes(dam_stages)
    dam = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    frozen = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    return dam, frozen


def test_frozen_layers_stay_bit_identical_and_the_dam_moves(make_job, source_model):
    job = make_job(settings=replace(QUICK, check="last"))  # the last weights, whatever the check
    _run(job)
    source = read_model_tensors(source_model)
    dam, frozen = _split(job.out, 2)
    assert set(dam) | set(frozen) == set(source)
    assert any(k.startswith("encoder.levels.1.") for k in frozen)  # deeper encoder is shared
    assert any(k.startswith("decoder_a.") for k in frozen)
    for key, value in frozen.items():
        assert torch.equal(value, source[key]), key
    assert any(not torch.equal(value, source[key]) for key, value in dam.items())


def test_critic_weights_stay_within_the_clip(make_job):
    job = make_job()
    _run(job)
    critic = {
        k: v for k, v in read_model_tensors(adapt.state_path(job.out)).items() if "critic" in k
    }
    assert critic
    limit = QUICK.clip
    assert max(float(v.abs().max()) for v in critic.values()) <= limit
    # The clip binds: some weights sit on it (RMSProp steps are far larger than 0.03).
    assert any(float(v.abs().max()) == pytest.approx(limit) for v in critic.values())


def test_a_dam_step_changes_only_dam_parameters(source_model):
    source = load_checkpoint(source_model).network
    before = {k: v.clone() for k, v in source.state_dict().items()}
    target = adapt.plug_in_dam(source, 2)
    trainable = {id(p) for p in adapt.dam_parameters(target)}
    names = {n for n, p in target.named_parameters() if id(p) in trainable}
    assert names and all(n.startswith(adapt.dam_prefixes(2)) for n in names)
    optimizer = torch.optim.RMSprop(adapt.dam_parameters(target), lr=3e-4)
    x = torch.randn(2, TINY_NET.in_slices, 64, 64)
    loss = -sum(m.mean() for m in adapt.critic_inputs(target, x, 4))
    loss.backward()
    optimizer.step()
    after = target.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(adapt.dam_prefixes(2)) for k in changed)
    # The source network is untouched (its layers above the DAM are the target's).
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    assert target.decoder_a is source.decoder_a


def test_warm_up_trains_the_critic_only(make_job, source_model):
    job = make_job(steps=2, settings=replace(QUICK, warmup_steps=2))
    events = _run(job)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.extra["warmup"] for e in progress] == [1.0, 1.0]
    assert all("dam" not in e.losses and "wasserstein" in e.losses for e in progress)
    source = read_model_tensors(source_model)
    for key, value in read_model_tensors(job.out).items():
        assert torch.equal(value, source[key]), key


def test_progress_reports_wasserstein_and_dam_loss(make_job):
    events = _run(make_job())
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.step for e in progress] == [1, 2, 3]
    assert all(e.phase == "adapt" for e in progress)
    assert "dam" in progress[-1].losses and np.isfinite(progress[-1].losses["wasserstein"])


def test_the_adapted_model_is_an_ordinary_ct_model(make_job, pair, source_model):
    _, ct = pair
    job = make_job()
    _run(job)
    card = read_card(job.out)
    assert card.modality == "CT"
    assert card.normalization.method == "ct_window"
    assert card.classes == read_card(source_model).classes
    assert card.training["source_model"]["path"] == str(source_model)
    assert card.training["source_model"]["modality"] == "MR"
    assert card.training["dam_stages"] == 2 and card.training["ct_labels_used"] is False
    assert card.training["settings"]["clip"] == 0.03
    labels = predict_volume(load_checkpoint(job.out), ct.image, device="cpu")
    assert labels.shape == ct.image.shape
    # ... and fine-tuning accepts it as a starting point.
    painted = np.zeros_like(ct.labels.array)
    painted[8] = ct.labels.array[8]
    tuned = finetune.FinetuneJob(
        image=ct.image,
        labels=painted,
        out=job.out.with_name("tuned.safetensors"),
        classes=ct.classes,
        model=job.out,
        steps=1,
        device="cpu",
        settings=replace(finetune.FinetuneSettings.supervised(), batch_labelled=1),
    )
    events = list(finetune.run(tuned))
    assert any(isinstance(e, Notice) and "all weights" in e.message for e in events)


def test_cancel_leaves_a_loadable_model_and_resume_continues_the_count(make_job):
    cancel = threading.Event()
    job = make_job(steps=4)
    events = []
    for event in adapt.run(job, cancel):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2:
            cancel.set()
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled
    assert done.summary["steps_done"] == 2
    assert read_card(done.checkpoint).training["steps_done"] == 2
    load_checkpoint(done.checkpoint)  # complete and loadable

    resumed = _run(
        replace(job, resume_from=done.checkpoint, out=job.out.with_name("b.safetensors"))
    )
    assert any(isinstance(e, Notice) and "at step 2" in e.message for e in resumed)
    steps = [e.step for e in resumed if isinstance(e, Progress)]
    assert steps == [3, 4]
    assert read_card(resumed[-1].checkpoint).training["steps_done"] == 4


def test_resume_refuses_another_dam_size(make_job):
    job = make_job(steps=1)
    _run(job)
    with pytest.raises(FewLabelError, match="same settings"):
        list(adapt.run(replace(job, resume_from=job.out, settings=replace(QUICK, dam_stages=1))))


def test_wgan_gp_option_trains_without_clipping(make_job):
    job = make_job(settings=replace(QUICK, objective="gp"))
    events = _run(job)
    assert read_card(job.out).training["settings"]["objective"] == "gp"
    assert all(np.isfinite(e.losses["wasserstein"]) for e in events if isinstance(e, Progress))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"out": Path("adapted.pt")}, "safetensors"),
        ({"target": ()}, "at least one CT"),
        ({"steps": 0}, "at least 1"),
        ({"source": ()}, "--source"),
        ({"settings": replace(QUICK, dam_stages=9)}, "between 1 and"),
    ],
)
def test_bad_input_says_what_to_do(make_job, changes, match):
    with pytest.raises(FewLabelError, match=match):
        list(adapt.run(make_job(**changes)))


def test_an_mr_target_or_a_ct_source_model_is_refused(make_job, pair, tmp_path):
    mr, _ = pair
    with pytest.raises(FewLabelError, match="marked as MR"):
        list(adapt.run(make_job(target=(mr.image,))))
    adapted = make_job()
    _run(adapted)
    with pytest.raises(FewLabelError, match="already a CT model"):
        list(adapt.run(make_job(source_model=adapted.out, out=tmp_path / "again.safetensors")))


def test_a_source_model_trains_on_several_labelled_volumes(tmp_path):
    first = cardiac_phantom("MR", 0, SHAPE, SPACING)
    second = cardiac_phantom("MR", 1, SHAPE, SPACING)
    job = finetune.FinetuneJob(
        image=first.image,
        labels=first.labels,
        extra_labelled=((second.image, second.labels),),
        out=tmp_path / "mr.safetensors",
        classes=first.classes,
        model="random",
        steps=2,
        device="cpu",
        settings=replace(finetune.FinetuneSettings.supervised(), batch_labelled=4),
        architecture=TINY_NET,
    )
    events = list(finetune.run(job))
    n_first = int((first.labels.array.reshape(SHAPE[0], -1).max(axis=1) > 0).sum())
    n_second = int((second.labels.array.reshape(SHAPE[0], -1).max(axis=1) > 0).sum())
    start = next(e for e in events if isinstance(e, Notice) and "Fine-tuning on" in e.message)
    held = len(read_card(job.out).training["data"]["held_out_slices"])
    assert f"{n_first + n_second - held} labelled slice(s)" in start.message
    assert read_card(job.out).training["data"]["extra_labelled_volumes"] == 1


def test_extra_labelled_volume_on_another_grid_is_refused(tmp_path):
    first = cardiac_phantom("MR", 0, SHAPE, SPACING)
    job = finetune.FinetuneJob(
        image=first.image,
        labels=first.labels,
        extra_labelled=((first.image, first.labels.array[:-1]),),
        out=tmp_path / "mr.safetensors",
        model="random",
        steps=1,
        device="cpu",
        architecture=TINY_NET,
    )
    with pytest.raises(FewLabelError, match="differs from the image shape"):
        list(finetune.run(job))


# ------------------------------------------------------------ which checkpoint is kept
def test_the_start_is_scored_and_kept_when_no_checkpoint_beats_it(make_job, source_model):
    # start_agreement is 1.0 at the start and can only fall: nothing beats the start.
    job = make_job(settings=replace(QUICK, check="start_agreement", check_every=1))
    events = _run(job)
    done = events[-1]
    assert isinstance(done, Done)
    assert [c["step"] for c in done.summary["checks"]] == [0, 1, 2, 3]
    assert done.summary["checks"][0]["start_agreement"] == 1.0
    assert done.summary["verdict"] == adapt.NO_IMPROVEMENT
    assert any(
        isinstance(e, Notice) and adapt.NO_IMPROVEMENT in e.message and e.level == "warning"
        for e in events
    )
    selection = read_card(job.out).training["selection"]
    assert selection["kept_start"] is True and selection["best_step"] == 0
    assert selection["verdict"] == adapt.NO_IMPROVEMENT
    # The written model is the source network itself; the state keeps the last weights.
    source = read_model_tensors(source_model)
    for key, value in read_model_tensors(job.out).items():
        assert torch.equal(value, source[key]), key
    last = read_model_tensors(adapt.state_path(job.out))
    dam_keys = [k for k in last if k.startswith("last.encoder.stem.")]
    assert dam_keys and any(not torch.equal(last[k], source[k[5:]]) for k in dam_keys)


def test_the_checkpoint_with_the_best_check_is_the_one_written(make_job, tmp_path):
    check = "proportion_gap"  # lower is better
    job = make_job(
        steps=4,
        settings=replace(QUICK, check=check, check_every=1, check_margin=0.0),
        checkpoints_dir=tmp_path / "every",
    )
    done = _run(job)[-1]
    assert isinstance(done, Done)
    checks = done.summary["checks"]
    assert len(checks) == 5 and all(set(adapt_check.HIGHER_IS_BETTER) <= set(c) for c in checks)
    best = min(checks, key=lambda c: (c[check], c["step"]))  # the first of the best
    selection = done.summary["selection"]
    assert selection["best_step"] == best["step"]
    assert selection["kept_start"] is (best["step"] == 0)
    kept = read_model_tensors(job.out)
    snapshot = read_model_tensors(tmp_path / "every" / f"step_{int(best['step'])}.safetensors")
    assert kept.keys() == snapshot.keys()
    assert all(torch.equal(kept[k], snapshot[k]) for k in kept)
    rescored = adapt_check.label_free_scores(
        load_checkpoint(job.out).network,
        _reference_like_the_job(job),
        torch.device("cpu"),
        precision_for(torch.device("cpu")),
    )
    assert rescored[check] == pytest.approx(best[check], abs=1e-6)


def _reference_like_the_job(job: adapt.AdaptJob) -> adapt_check.CheckReference:
    """The check's reference as adapt.run builds it, from the job's own inputs."""
    source = load_checkpoint(job.source_model)
    card, net = source.card, source.network.eval()
    device = torch.device("cpu")
    precision = precision_for(device)
    stack = SliceStack(
        job.target[0].array,
        card.slice_axis,
        fit_intensity(job.target[0].array, job.settings.normalization()),
        card.input_size,
    )
    mr_stack = SliceStack(
        job.source[0].array,
        card.slice_axis,
        fit_intensity(job.source[0].array, card.normalization),
        card.input_size,
    )
    k = len(card.classes)
    windows = adapt._evenly_spaced_windows([stack], job.settings.check_slices, 3)
    mr = adapt._evenly_spaced_windows([mr_stack], job.settings.check_slices, 3)
    return adapt_check.CheckReference(
        target_windows=windows,
        start_labels=adapt_check.predicted_labels(net, windows, device, precision),
        source_proportions=adapt_check.class_proportions(
            adapt_check.predicted_labels(net, mr, device, precision), k
        ),
        num_classes=k,
    )


def test_resume_goes_on_from_the_last_weights_and_keeps_the_kept_ones(
    make_job, source_model, tmp_path
):
    settings = replace(QUICK, check="start_agreement", check_every=1)
    cancel = threading.Event()
    job = make_job(steps=4, settings=settings)
    for event in adapt.run(job, cancel):
        if isinstance(event, Progress) and event.step == 2:
            cancel.set()
    last = {
        k.removeprefix("last."): v
        for k, v in read_model_tensors(adapt.state_path(job.out)).items()
        if k.startswith("last.encoder.")
    }
    source = read_model_tensors(source_model)
    assert any(not torch.equal(v, source[k]) for k, v in last.items())
    # Learning rate 0: step 3 leaves the DAM where the resumed run found it.
    resumed = replace(
        job,
        steps=3,
        resume_from=job.out,
        out=tmp_path / "resumed.safetensors",
        settings=replace(settings, learning_rate=0.0),
        checkpoints_dir=tmp_path / "every",
    )
    done = _run(resumed)[-1]
    assert isinstance(done, Done) and done.summary["verdict"] == adapt.NO_IMPROVEMENT
    step_3 = read_model_tensors(tmp_path / "every" / "step_3.safetensors")
    assert all(torch.equal(step_3[k], v) for k, v in last.items())
    kept = read_model_tensors(resumed.out)
    assert all(torch.equal(v, source[k]) for k, v in kept.items())


#: Supervised steps of each known checkpoint: enough for a clear Dice gap on the CT.
KNOWN_STEPS = 200


@pytest.fixture(scope="module")
def two_known_checkpoints(pair, tmp_path_factory) -> tuple[Path, Path]:
    """An MR model (supervised) fed CT through the HU window, and it fine-tuned on the CT's labels."""
    mr, ct = pair
    folder = tmp_path_factory.mktemp("known")
    settings = replace(finetune.FinetuneSettings.supervised(), validation_min_labelled=999)
    torch.manual_seed(0)
    worse = folder / "mr.safetensors"
    list(
        finetune.run(
            finetune.FinetuneJob(
                image=mr.image, labels=mr.labels, out=worse, classes=mr.classes, model="random",
                steps=KNOWN_STEPS, device="cpu", settings=settings, architecture=TINY_NET,
                checkpoint_every_s=3600.0,
            )
        )
    )  # fmt: skip
    # The same network fed the CT through the HU window, then taught the CT's labels.
    as_ct = folder / "mr-as-ct.safetensors"
    model = load_checkpoint(worse)
    card = replace(model.card, normalization=NormalizationConfig("ct_window"), modality="CT")
    save_checkpoint(as_ct, model.network, card)
    better = folder / "ct.safetensors"
    list(
        finetune.run(
            finetune.FinetuneJob(
                image=ct.image, labels=ct.labels, out=better, classes=ct.classes, model=as_ct,
                steps=KNOWN_STEPS, device="cpu", settings=settings, checkpoint_every_s=3600.0,
            )
        )
    )  # fmt: skip
    return as_ct, better


def test_the_default_check_picks_the_better_of_two_known_checkpoints(
    pair, two_known_checkpoints, make_job
):
    _, ct = pair
    worse, better = two_known_checkpoints
    dice = {path: _dice_on(path, ct) for path in (worse, better)}
    assert dice[better] > dice[worse] + 0.1, dice  # known: CT labels made it better
    reference = _reference_like_the_job(replace(make_job(), source_model=worse))
    cpu = torch.device("cpu")
    quality = {
        path: adapt_check.quality(
            adapt_check.label_free_scores(
                load_checkpoint(path).network.eval(), reference, cpu, precision_for(cpu)
            ),
            adapt.DEFAULT_CHECK,
        )
        for path in (worse, better)
    }
    assert quality[better] > quality[worse] + adapt.AdaptSettings().check_margin, (dice, quality)


def test_check_last_keeps_the_last_weights(make_job, tmp_path):
    job = make_job(settings=replace(QUICK, check="last"), checkpoints_dir=tmp_path / "every")
    done = _run(job)[-1]
    assert isinstance(done, Done) and "verdict" not in done.summary
    assert "selection" not in read_card(job.out).training
    kept, last = (
        read_model_tensors(job.out),
        read_model_tensors(tmp_path / "every" / "step_3.safetensors"),
    )
    assert all(torch.equal(kept[k], last[k]) for k in kept)


def test_an_unknown_check_is_refused():
    with pytest.raises(FewLabelError, match="stream_agreement"):
        adapt.AdaptSettings(check="dice")


def test_label_free_scores_of_a_perfect_and_a_blank_prediction():
    # Two hand-made label maps stand in for networks: the scores' arithmetic.
    truth = torch.zeros(2, 8, 8, dtype=torch.int64)
    truth[:, 2:6, 2:6] = 1
    assert adapt_check.foreground_dice(truth, truth, 2) == 1.0
    assert adapt_check.foreground_dice(truth, torch.zeros_like(truth), 2) == 0.0
    shares = adapt_check.class_proportions(truth, 3)
    assert shares.tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert adapt_check.quality({"entropy": 0.2}, "entropy") > adapt_check.quality(
        {"entropy": 0.3}, "entropy"
    )


# ------------------------------------------------------------ painted CT slices
def _painted(ct: Any, slices: list[int]) -> Any:
    labels = np.zeros_like(ct.labels.array)
    labels[slices] = ct.labels.array[slices]
    return ct.labels.with_array(labels)


def test_painted_ct_slices_receive_the_supervised_loss(make_job, pair, source_model):
    _, ct = pair
    changes = {"steps": 4, "settings": replace(QUICK, check="last", supervised_weight=10.0)}
    plain = make_job(**changes)
    _run(plain)
    painted = make_job(
        **changes, target_labels=_painted(ct, [8]), out=plain.out.with_name("painted.safetensors")
    )
    events = _run(painted)
    progress = [e for e in events if isinstance(e, Progress)]
    assert "supervised" not in progress[0].losses  # the critic's warm-up: no DAM update
    assert all(np.isfinite(e.losses["supervised"]) for e in progress[1:])
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("1 painted CT slice(s) (8)" in m for m in notes)
    assert any("fewlabel finetune --model" in m for m in notes)  # the better route, said
    card = read_card(painted.out)
    assert card.training["ct_labels_used"] is True and card.training["ct_labelled_slices"] == [8]
    # The gradient reaches the DAM: the painted slice's loss is lower than after the same
    # adversarial steps without it, and the frozen layers are still the source's.
    source = read_model_tensors(source_model)
    _, frozen = _split(painted.out, 2)
    assert all(torch.equal(v, source[k]) for k, v in frozen.items())

    def loss_on_slice_8(path: Path) -> float:
        model = load_checkpoint(path)
        stack = SliceStack(
            ct.image.array, 0, fit_intensity(ct.image.array, model.card.normalization), (64, 64)
        )
        x = stack.windows(torch.tensor([8]), 3)
        y = fit_labels(ct.labels.array.astype(np.int64), 0, np.array([8]), stack.fit)
        with torch.no_grad():
            return float(dice_ce_loss(model.network(x)[0], y)[0])

    assert loss_on_slice_8(painted.out) < loss_on_slice_8(plain.out)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda ct: Volume.from_array(ct.labels.array[:-1], SPACING), "first CT scan"),
        (lambda ct: ct.labels.with_array(np.full_like(ct.labels.array, 9)), "model has 6 classes"),
        (lambda ct: ct.labels.with_array(np.zeros_like(ct.labels.array)), "no painted slice"),
    ],
)
def test_unusable_ct_labels_are_refused(make_job, pair, labels, match):
    _, ct = pair
    with pytest.raises(FewLabelError, match=match):
        list(adapt.run(make_job(target_labels=labels(ct))))


def _mean_dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    scores = []
    for k in range(1, classes):
        p, t = pred == k, truth == k
        denom = int(p.sum() + t.sum())
        scores.append(2 * int((p & t).sum()) / denom if denom else 1.0)
    return float(np.mean(scores))


def _dice_on(model_path: Path, ct: Any, window: bool = False) -> float:
    model = load_checkpoint(model_path)
    if window:  # the source network fed CT the CT way: where the DAM starts from
        model = replace(
            model, card=replace(model.card, normalization=NormalizationConfig("ct_window"))
        )
    pred = predict_volume(model, ct.image, device="cpu")
    return _mean_dice(pred, ct.labels.array, len(ct.classes))


@pytest.mark.slow
def test_adaptation_improves_ct_dice_on_the_phantom_pair(tmp_path):
    """MR phantom with labels -> CT phantom of another 'patient'; CT labels only score."""
    torch.manual_seed(0)
    shape, spacing = (32, 96, 96), (3.0, 2.0, 2.0)
    mr = cardiac_phantom("MR", 0, shape, spacing)
    ct = cardiac_phantom("CT", 1, shape, spacing)
    source = tmp_path / "mr.safetensors"
    source_job = finetune.FinetuneJob(
        image=mr.image,
        labels=mr.labels,
        out=source,
        classes=mr.classes,
        model="random",
        steps=SOURCE_STEPS,
        device="cpu",
        settings=replace(finetune.FinetuneSettings.supervised(), validation_min_labelled=999),
        architecture=UNetConfig(in_slices=3, widths=(8, 16, 32, 64), full_res_width=4),
        checkpoint_every_s=3600.0,
    )
    list(finetune.run(source_job))
    as_mr, as_ct = _dice_on(source, ct), _dice_on(source, ct, window=True)
    job = adapt.AdaptJob(
        source_model=source,
        target=(ct.image,),
        source=(mr.image,),
        out=tmp_path / "ct.safetensors",
        steps=ADAPT_STEPS,
        device="cpu",
        settings=adapt.AdaptSettings.wgan_gp(warmup_steps=10),
        checkpoint_every_s=3600.0,
    )
    _run(job)
    after = _dice_on(job.out, ct)
    print(
        f"source on CT: {as_mr:.3f} (MR normalisation), {as_ct:.3f} (HU window); adapted {after:.3f}"
    )
    assert after >= as_ct + IMPROVEMENT, (as_mr, as_ct, after)


#: The configuration of `benchmarks/adaptation.py --objective gp --adapt-steps 900` (WGAN-GP,
#: 5 critic updates per DAM update): 0.601 -> 0.820 on 2 threads. Other job seeds gained
#: 0.195-0.22 (docs/benchmarks.md), so the +0.2 holds for this seed, not with a wide margin; the
#: paper's weight clipping gains about 0.11-0.13 on this pair, hence the WGAN-GP preset here.
#: About 5 minutes on 2 CPU threads: shorter source training leaves a weak source model (0.28 at
#: 300 steps) that adaptation cannot help.
SOURCE_STEPS = 700
ADAPT_STEPS = 900
IMPROVEMENT = 0.2


def test_the_critic_sees_the_regions_given_and_the_card_records_them(make_job, pair):
    mr, _ = pair
    box = ((4, 12), (16, 48), (8, 56))
    job = make_job(
        settings=replace(QUICK, critic_region="anatomy", region_margin=0.0),
        source_labels=mr.labels,
        target_box=box,
    )
    events = _run(job)
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("CT scan 1" in n and "from CT box" in n for n in notes)
    assert any("MRI scan 1" in n and "from MRI labels" in n for n in notes)
    regions = read_card(job.out).training["critic_regions"]
    # 64 x 64 slices at the tiny net's 64 x 64 input: the box is the voxel box (squared).
    first, last = regions["ct"][0]["slices"]
    assert (first, last) == (3, 12)  # 4..11 grown by the one-slice minimum
    # Rows 16..47 and columns 8..55 grow by two pixels, then the rows to the square input.
    assert regions["ct"][0]["box"] == pytest.approx([6 / 64, 6 / 64, 58 / 64, 58 / 64], abs=1e-3)
    labelled = np.flatnonzero(mr.labels.array.any(axis=(1, 2)))
    first, last = regions["mri"][0]["slices"]
    assert first <= labelled[0] and last >= labelled[-1] and last - first < SHAPE[0] + 1


def test_without_a_box_the_region_comes_from_the_source_models_prediction(make_job):
    events = _run(make_job(settings=replace(QUICK, critic_region="anatomy")))
    notes = [e.message for e in events if isinstance(e, Notice)]
    regional = [n for n in notes if "The critic sees" in n or "no foreground" in n]
    assert len(regional) == 2  # one per scan: MRI and CT
    assert all("prediction" in n or "whole slices" in n for n in regional)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"target_box": ((0, 99), (0, 64), (0, 64))}, "outside the scan"),
        ({"source_labels": Volume.from_array(np.ones((3, 4, 5), np.uint8))}, "grid"),
        ({"target_box": ((0, 4), (0, 64), (0, 64)), "settings": QUICK}, "critic_region='anatomy'"),
    ],
)
def test_a_bad_region_is_refused_before_training(make_job, changes, match):
    job = make_job(**{"settings": replace(QUICK, critic_region="anatomy"), **changes})
    with pytest.raises(FewLabelError, match=match):
        list(adapt.run(job))
    assert not job.out.exists()


def test_an_unknown_critic_region_is_refused():
    with pytest.raises(FewLabelError, match="critic_region"):
        adapt.AdaptSettings(critic_region="box")  # type: ignore[arg-type]


def test_empty_mri_labels_for_the_region_are_refused(make_job, pair):
    mr, _ = pair
    empty = mr.labels.with_array(np.zeros_like(mr.labels.array))
    job = make_job(settings=replace(QUICK, critic_region="anatomy"), source_labels=empty)
    with pytest.raises(FewLabelError, match="hold no voxel"):
        list(adapt.run(job))
    assert not job.out.exists()
