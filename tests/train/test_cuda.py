"""The GPU path end to end: fine-tuning, prediction, pretraining and torchrun with NCCL.

Skipped where PyTorch sees no CUDA GPU (CI); run on a GPU machine with
``pytest -m cuda``. docs/benchmarks.md records the last run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import TINY_NET as TINY_PRETRAIN_NET
from test_pretrain import _job as pretrain_job

from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.models.checkpoint import (
    load_checkpoint,
    load_encoder_weights,
    read_card,
)
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.events import Done, Progress
from napari_fewlabel.train.finetune import run as finetune
from napari_fewlabel.train.pretrain import run as pretrain

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_finetuning_on_the_gpu_trains_in_mixed_precision_and_predicts_like_the_cpu(make_job):
    events = list(finetune(make_job(steps=30, device="cuda")))
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(p.device.startswith("cuda") for p in progress)
    assert all(math.isfinite(p.losses["total"]) for p in progress)
    training = read_card(done.checkpoint).training
    assert training["precision"] in ("bfloat16", "float16")

    # A model trained on the GPU predicts on the CPU (a machine without one).
    model = load_checkpoint(done.checkpoint)
    image = make_job().image
    on_gpu = predict_volume(model, image, device="cuda")
    on_cpu = predict_volume(model, image, device="cpu")
    assert on_gpu.shape == on_cpu.shape == image.shape
    # Mixed precision may flip a voxel on a class boundary, not more.
    assert np.mean(on_gpu == on_cpu) > 0.99


@pytest.mark.parametrize("method", ["ideal", "medmoco"])
def test_pretraining_on_the_gpu_writes_an_encoder_the_cpu_loads(method, scans, tmp_path):
    events = list(pretrain(replace(pretrain_job(scans, tmp_path, method), device="cuda")))
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(math.isfinite(p.losses["total"]) for p in progress)
    assert "cuda" in read_card(done.checkpoint).training["device"]
    network = TwoStreamUNet(replace(TINY_PRETRAIN_NET, num_classes=4))
    assert load_encoder_weights(network, done.checkpoint)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process")
def test_torchrun_on_two_gpus_uses_nccl(scans, tmp_path):
    """One process per GPU under torchrun: the NCCL path of DistributedDataParallel."""
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "napari_fewlabel.cli", "pretrain", *map(str, scans), "--method", "medmoco",
        "--out", str(out), "--steps", "2", "--batch-size", "8", "--device", "cuda",
        "--view-size", "32", "--slice-size", "64", "--workers", "0",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    training = read_card(out).training
    assert training["processes"] == 2 and training["backend"] == "nccl"
    assert "cuda" in training["device"]
