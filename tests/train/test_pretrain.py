from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_fewlabel.data.views import ViewConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.checkpoint import (
    is_encoder_only,
    load_checkpoint,
    load_encoder_weights,
    read_card,
    read_model_tensors,
)
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train import pretrain
from napari_fewlabel.train.events import Done, Notice, Progress
from napari_fewlabel.train.pretrain import PretrainJob, PretrainSettings, run, state_path

TINY_NET = UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4)
BATCH = 4


def _tiny_settings(method: str) -> PretrainSettings:
    return replace(
        PretrainSettings.for_method(method),
        batch_size=BATCH,
        block_size=2,
        views=ViewConfig(size=(32, 32)),
        points_per_image=16,
        projection_dim=16,
        hidden_dim=32,
        regions_per_image=2,
        rank_every=2,
        rank_window=16,
    )


def _job(scans, tmp_path, method="ideal", **changes) -> PretrainJob:
    job = PretrainJob(
        data=scans,
        out=tmp_path / "encoder.safetensors",
        settings=_tiny_settings(method),
        architecture=TINY_NET,
        steps=3,
        device="cpu",
        checkpoint_every=100,
        slice_size=64,
        num_workers=0,
    )
    return replace(job, **changes)


def test_ideal_writes_an_encoder_that_loads_into_the_finetuning_network(scans, tmp_path):
    events = list(run(_job(scans, tmp_path)))
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    assert sum(isinstance(e, Done) for e in events) == 1
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert all(p.phase == "pretrain" and p.total == 3 for p in progress)
    assert set(progress[-1].losses) == {"total", "dense"}
    assert 1.0 <= progress[-1].extra["effective_rank"] <= 32
    assert progress[-1].extra["slices_per_s"] > 0

    card = read_card(done.checkpoint)
    assert is_encoder_only(card)
    assert card.modality == "MR" and card.normalization.method == "percentile_zscore"
    training = card.training
    assert training["steps_done"] == 3 and "IDEAL" in training["method"]
    assert training["data"]["usable_slices"] > 0 and len(training["data"]["scans"]) == 2
    for key in ("date", "hardware", "device", "effective_rank", "differences_from_paper"):
        assert training[key]

    network = TwoStreamUNet(replace(TINY_NET, num_classes=4))
    loaded = load_encoder_weights(network, done.checkpoint)
    assert loaded == sorted(network.encoder.state_dict())
    trained = read_model_tensors(state_path(done.checkpoint))
    for name, value in network.encoder.state_dict().items():
        assert torch.equal(value, trained[f"query.encoder.{name}"])
    with pytest.raises(FewLabelError, match=r"pretrained encoder.*fine-tune"):
        load_checkpoint(done.checkpoint)


def test_medmoco_logs_every_term_and_its_queue_fills(scans, tmp_path):
    events = list(run(_job(scans, tmp_path, method="medmoco")))
    progress = [e for e in events if isinstance(e, Progress)]
    assert set(progress[-1].losses) == {"total", "global", "local", "decorrelation"}
    assert "effective_rank_projection" in progress[-1].extra
    assert [p.extra["queue_keys_seen"] for p in progress] == [4.0, 8.0, 12.0]
    notices = " ".join(e.message for e in events if isinstance(e, Notice))
    assert "queue of" in notices
    state = read_model_tensors(state_path(tmp_path / "encoder.safetensors"))
    assert int(state["queue.keys_seen"]) == 3 * BATCH
    # The momentum encoder moved towards the query encoder but is not equal to it.
    name = "encoder.stem.0.weight"
    assert not torch.equal(state[f"key.{name}"], state[f"query.{name}"])


def test_cancel_then_resume_continues_steps_queue_and_momentum_encoder(scans, tmp_path):
    cancel = threading.Event()
    events = []
    for event in run(_job(scans, tmp_path, method="medmoco", steps=4), cancel):
        events.append(event)
        if isinstance(event, Progress) and event.step == 2:
            cancel.set()
    done = events[-1]
    assert isinstance(done, Done) and done.cancelled
    assert read_card(done.checkpoint).training["steps_done"] == 2
    saved = read_model_tensors(state_path(done.checkpoint))
    assert int(saved["queue.keys_seen"]) == 2 * BATCH

    # Resuming a run that has nothing left to do writes back exactly what it read.
    again = list(run(_job(scans, tmp_path, method="medmoco", steps=2, resume_from=done.checkpoint)))
    assert isinstance(again[-1], Done)
    reread = read_model_tensors(state_path(done.checkpoint))
    for name in ("queue.keys", "queue.pointer", "key.encoder.stem.0.weight"):
        assert torch.equal(saved[name], reread[name])

    resumed = list(
        run(_job(scans, tmp_path, method="medmoco", steps=4, resume_from=done.checkpoint))
    )
    assert any(isinstance(e, Notice) and "at step 2" in e.message for e in resumed)
    progress = [e for e in resumed if isinstance(e, Progress)]
    assert [p.step for p in progress] == [3, 4]
    assert progress[0].extra["queue_keys_seen"] == 3 * BATCH
    assert read_card(resumed[-1].checkpoint).training["steps_done"] == 4


def test_resume_refuses_another_method(scans, tmp_path):
    done = list(run(_job(scans, tmp_path, steps=1)))[-1]
    with pytest.raises(FewLabelError, match="another method"):
        list(run(_job(scans, tmp_path, method="medmoco", resume_from=done.checkpoint)))


def test_continued_pretraining_starts_from_the_encoder_and_records_its_data(scans, tmp_path):
    first = list(run(_job(scans[:1], tmp_path, out=tmp_path / "a.safetensors", steps=2)))[
        -1
    ].checkpoint
    # Zero steps: the encoder written is the one started from, bit for bit.
    same = list(
        run(
            _job(
                scans[1:],
                tmp_path,
                out=tmp_path / "b.safetensors",
                steps=1,
                time_budget_s=0.0,
                init_from=first,
            )
        )
    )
    assert any(isinstance(e, Notice) and first.name in e.message for e in same)
    start, kept = read_model_tensors(first), read_model_tensors(same[-1].checkpoint)
    assert all(torch.equal(start[name], kept[name]) for name in start)

    events = list(
        run(_job(scans[1:], tmp_path, out=tmp_path / "c.safetensors", steps=2, init_from=first))
    )
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    moved = read_model_tensors(done.checkpoint)
    assert not torch.equal(start["encoder.stem.0.weight"], moved["encoder.stem.0.weight"])
    training = read_card(done.checkpoint).training
    assert training["steps_done"] == 2
    assert [s["path"] for s in training["data"]["scans"]] == [str(scans[1])]
    earlier = training["continued_from"]
    assert earlier["encoder"] == first.name and earlier["steps_done"] == 2
    assert [s["path"] for s in earlier["scans"]] == [str(scans[0])]

    # Resuming the continued run keeps the record of what it started from.
    resumed = list(
        run(_job(scans[1:], tmp_path, out=done.checkpoint, steps=3, resume_from=done.checkpoint))
    )
    training = read_card(resumed[-1].checkpoint).training
    assert training["steps_done"] == 3 and training["continued_from"] == earlier


def test_continued_pretraining_refuses_another_architecture_and_a_resume(scans, tmp_path):
    first = list(run(_job(scans, tmp_path, out=tmp_path / "a.safetensors", steps=1)))[-1].checkpoint
    wider = replace(TINY_NET, widths=(8, 16, 64))
    with pytest.raises(FewLabelError, match=r"another architecture.*widths"):
        list(
            run(
                _job(
                    scans,
                    tmp_path,
                    out=tmp_path / "b.safetensors",
                    architecture=wider,
                    init_from=first,
                )
            )
        )
    with pytest.raises(FewLabelError, match="not both"):
        list(
            run(
                _job(
                    scans,
                    tmp_path,
                    out=tmp_path / "c.safetensors",
                    init_from=first,
                    resume_from=first,
                )
            )
        )


def test_half_precision_storage_halves_the_file_and_loads_as_float32(scans, tmp_path):
    done = list(run(_job(scans, tmp_path, steps=1, half=True)))[-1]
    full = read_model_tensors(state_path(done.checkpoint))
    stored = read_model_tensors(done.checkpoint)
    assert {v.dtype for v in stored.values()} == {torch.float16}
    network = TwoStreamUNet(TINY_NET)
    load_encoder_weights(network, done.checkpoint)
    for name, value in network.encoder.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.allclose(value, full[f"query.encoder.{name}"], atol=1e-3, rtol=1e-3)


def test_finetuning_starts_from_the_pretrained_encoder(scans, tmp_path, make_job):
    from napari_fewlabel.train import finetune

    encoder = list(run(_job(scans, tmp_path, steps=1)))[-1].checkpoint
    events = list(finetune.run(make_job(model=encoder, steps=2)))
    assert any(isinstance(e, Notice) and "(encoder)" in e.message for e in events)
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    assert load_checkpoint(done.checkpoint).card.training["started_from"].endswith("(encoder)")


def test_a_time_budget_stops_the_run_with_a_checkpoint(scans, tmp_path):
    done = list(run(_job(scans, tmp_path, steps=50, time_budget_s=0.0)))[-1]
    assert isinstance(done, Done) and not done.cancelled
    assert done.summary["steps_done"] == 0
    assert read_card(done.checkpoint).training["steps_done"] == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"out": Path("encoder.pt")}, "safetensors"),
        ({"steps": 0}, "at least 1"),
        ({"slice_size": 60}, "multiple of 8"),
    ],
)
def test_bad_jobs_are_refused_before_training(scans, tmp_path, changes, message):
    with pytest.raises(FewLabelError, match=message):
        list(run(_job(scans, tmp_path, **changes)))


def test_too_few_slices_for_a_batch_is_a_user_error(scans, tmp_path):
    settings = replace(_tiny_settings("ideal"), batch_size=1024, block_size=256)
    with pytest.raises(FewLabelError, match="too few"):
        list(run(_job(scans, tmp_path, settings=settings)))


def test_queue_size_follows_the_data():
    assert pretrain._auto_queue_size(1512, 32) == 352
    assert pretrain._auto_queue_size(10, 32) == 32
    assert pretrain._auto_queue_size(10**7, 256) == 65536


def test_two_processes_under_torchrun(scans, tmp_path):
    """``fewlabel pretrain`` under torchrun on 2 CPU processes (gloo)."""
    out = tmp_path / "ddp.safetensors"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    steps, batch = 2, 8
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "napari_fewlabel.cli", "pretrain", *map(str, scans), "--method", "medmoco",
        "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--device", "cpu",
        "--view-size", "32", "--slice-size", "64", "--workers", "0",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 reports and writes; both ranks ran to the end (torchrun exits 0 only then).
    assert result.stdout.count("Wrote ") == 1
    assert "x 2 process(es)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, state_path(out).name]
    network = TwoStreamUNet(UNetConfig())
    load_encoder_weights(network, out)
    card = read_card(out)
    assert card.training["processes"] == 2 and card.training["global_batch"] == 2 * batch
    assert card.training["backend"] == "gloo"
    state = read_model_tensors(state_path(out))
    # Every step added the keys of both ranks' batches to the (shared) queue.
    assert int(state["queue.keys_seen"]) == steps * batch * 2
