"""DrasCLR pretraining: events, encoder + state checkpoints, resume, cancel, torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_fewlabel.data.emphysema_phantom import emphysema_phantom
from napari_fewlabel.data.patches3d import PatchAugment
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import save_image
from napari_fewlabel.models.checkpoint import (
    is_encoder_only,
    read_card,
    read_model_tensors,
    state_path,
)
from napari_fewlabel.models.drasclr import DrasCLRConfig, DrasCLREncoder
from napari_fewlabel.train.events import Done, Notice, Progress
from napari_fewlabel.train.pretrain_drasclr import DrasCLRPretrainJob, DrasCLRSettings, run

TINY = DrasCLRConfig(widths=(4, 4, 8, 16), experts=2, patch_size=8, patch_spacing_mm=5.0)
SETTINGS = DrasCLRSettings(
    batch_size=4,
    queue_size=8,
    bins_per_axis=2,
    projection_dim=16,
    hidden_dim=16,
    augment=PatchAugment(translate=0.25, noise_std=0.02),
)


@pytest.fixture(scope="module")
def chests(tmp_path_factory) -> tuple[Path, ...]:
    folder = tmp_path_factory.mktemp("chests")
    return tuple(
        save_image(
            emphysema_phantom(seed, shape=(32, 40, 56), spacing_mm=(5.0, 5.0, 5.0)).scan,
            folder / f"chest{seed}.nii.gz",
        )
        for seed in (0, 1)
    )


def _job(chests, tmp_path, **changes) -> DrasCLRPretrainJob:
    job = DrasCLRPretrainJob(
        data=chests,
        out=tmp_path / "drasclr.safetensors",
        settings=SETTINGS,
        architecture=TINY,
        steps=3,
        device="cpu",
    )
    return replace(job, **changes)


def test_pretraining_writes_an_encoder_that_loads_and_fills_the_location_queues(chests, tmp_path):
    events = list(run(_job(chests, tmp_path)))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert set(progress[-1].losses) == {"total", "local", "neighbour"}
    assert progress[-1].extra["queue_keys_seen"] == 12.0
    assert progress[-1].extra["scan_loads"] == 2.0  # each scan read once, then cached
    assert "drasclr" in next(e.message for e in events if isinstance(e, Notice))
    done = events[-1]
    assert (
        isinstance(done, Done)
        and not done.cancelled
        and sum(isinstance(e, Done) for e in events) == 1
    )

    card = read_card(done.checkpoint)
    assert is_encoder_only(card) and card.modality == "CT"
    assert card.normalization.window_hu == (-1024.0, 240.0)
    assert DrasCLRConfig.from_dict(card.architecture) == TINY
    assert card.training["steps_done"] == 3 and card.training["differences_from_paper"]
    encoder = DrasCLREncoder(TINY)
    tensors = read_model_tensors(done.checkpoint)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items()})
    state = read_model_tensors(state_path(done.checkpoint))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, state[f"query.encoder.{name}"])
    assert state["queues.keys"].shape == (8, 8, 16) and int(state["queues.keys_seen"]) == 12


def test_resume_continues_and_cancel_keeps_a_checkpoint(chests, tmp_path):
    first = list(run(_job(chests, tmp_path, steps=2)))[-1]
    resumed = list(run(_job(chests, tmp_path, steps=4, resume_from=first.checkpoint)))
    assert [e.step for e in resumed if isinstance(e, Progress)] == [3, 4]
    assert any(isinstance(e, Notice) and "Resuming" in e.message for e in resumed)
    assert int(read_model_tensors(state_path(first.checkpoint))["queues.keys_seen"]) == 16

    with pytest.raises(FewLabelError, match="another method or network"):
        list(
            run(
                _job(
                    chests,
                    tmp_path,
                    architecture=replace(TINY, patch_size=12),
                    resume_from=first.checkpoint,
                )
            )
        )

    cancel = threading.Event()
    cancel.set()
    events = list(run(_job(chests, tmp_path, out=tmp_path / "c.safetensors"), cancel))
    assert isinstance(events[-1], Done) and events[-1].cancelled
    assert read_card(events[-1].checkpoint).training["steps_done"] == 0


def test_a_scan_that_is_not_ct_is_refused_with_its_name(tmp_path):
    import nibabel as nib
    import numpy as np

    path = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 300, np.int16), np.eye(4)), path)
    with pytest.raises(FewLabelError, match=r"mr\.nii\.gz.*Hounsfield"):
        list(run(_job((path,), tmp_path)))


def test_two_processes_under_torchrun(chests, tmp_path):
    """``fewlabel pretrain --method drasclr`` under torchrun on 2 CPU processes (gloo)."""
    out = tmp_path / "ddp.safetensors"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    steps, batch = 2, 4
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "napari_fewlabel.cli", "pretrain", *map(str, chests), "--method", "drasclr",
        "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--device", "cpu",
        "--patch-size", "8", "--patch-spacing", "5", "--queue-size", "16",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 reports and writes; both ranks ran to the end (torchrun exits 0 only then).
    assert result.stdout.count("Wrote ") == 1
    assert "x 2 process(es)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, state_path(out).name]
    card = read_card(out)
    assert card.training["processes"] == 2 and card.training["global_batch"] == 2 * batch
    encoder = DrasCLREncoder(DrasCLRConfig.from_dict(card.architecture))
    tensors = read_model_tensors(out)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items()})
    state = read_model_tensors(state_path(out))
    # Every step put the keys of both ranks' batches into the (shared) location queues.
    assert int(state["queues.keys_seen"]) == steps * batch * 2


def test_subtype_training_starts_from_the_pretrained_encoder(chests, tmp_path):
    import numpy as np

    from napari_fewlabel.infer.subtypes import load_subtype_model
    from napari_fewlabel.io import load_volume
    from napari_fewlabel.train.subtypes import SubtypeJob
    from napari_fewlabel.train.subtypes import run as train_subtypes

    encoder_file = list(run(_job(chests, tmp_path, steps=1)))[-1].checkpoint
    scan = load_volume(chests[0])
    painted = np.zeros(scan.shape, np.uint8)
    painted[12:16, 16:20, 14:18] = 1  # inside the right lung
    painted[12:16, 16:20, 38:42] = 4  # inside the left lung
    job = SubtypeJob(
        scans=(scan,),
        labels=(scan.with_array(painted),),
        out=tmp_path / "subtypes.safetensors",
        encoder=encoder_file,
        steps=1,
        device="cpu",
    )
    events = list(train_subtypes(job, cancel=None))
    assert encoder_file.name in events[0].message
    model = load_subtype_model(events[-1].checkpoint)
    assert model.config == TINY  # the encoder's patch geometry, not the job's default
    assert model.card.training["encoder"].endswith(encoder_file.name)
