"""Tri-planar training on a real MRI beats a plain MONAI UNet given the same two slices.

The ITK example head T1 (128 x 62 x 128) and its skull-stripped brain: two
slices of the brain mask are given, and the brain on every other slice holding
brain is scored. Both networks train the same number of steps on the same
labelled slices; ours also learns from the lines those slices draw across the
coronal and sagittal slices.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_fewlabel.data.augment import AugmentConfig, random_geometry, warp
from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.input_fit import choose_input_size
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io.load import load_volume
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import RANDOM_INIT, FinetuneJob, FinetuneSettings, run
from real_data import itk_t1, itk_t1_skullstrip

STEPS = 60


def _dice(pred: np.ndarray, truth: np.ndarray, scored: np.ndarray) -> float:
    p, t = pred[scored] == 1, truth[scored] == 1
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def _monai_peer(image: np.ndarray, partial: np.ndarray, labelled: list[int]) -> np.ndarray:
    """A plain MONAI UNet of about our size on the labelled slices (Dice + CE, same augmentation)."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    mapping = fit_intensity(image, NormalizationConfig.for_modality("MR"))
    size = choose_input_size(image.shape[1:], max_side=256, multiple=16)
    stack = SliceStack(image, 0, mapping, size)
    targets = fit_labels(partial, 0, np.array(labelled), stack.fit)
    net = UNet(2, 1, 2, channels=(20, 40, 80, 160, 320), strides=(2, 2, 2, 2), num_res_units=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    centres = torch.tensor(labelled)
    for _ in range(STEPS):
        pick = torch.randint(0, len(labelled), (8,), generator=generator)
        theta = random_geometry(8, AugmentConfig(), generator, torch.device("cpu"))
        x, y = warp(stack.windows(centres[pick], 1), targets[pick], theta)
        loss, _ = dice_ce_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        proba = net(stack.slices[:, None]).softmax(dim=1)
    return stack.fit.probabilities_from_input(proba).argmax(dim=1).numpy()


@pytest.mark.slow
def test_tri_planar_training_beats_the_monai_peer_on_a_real_head_mri(tmp_path):
    image = load_volume(itk_t1())
    brain = (load_volume(itk_t1_skullstrip()).array > 0).astype(np.uint8)
    holds = np.flatnonzero(brain.any(axis=(1, 2)))
    lo, hi = int(holds[0]), int(holds[-1])
    labelled = [int(lo + (i + 0.5) * (hi - lo + 1) / 2) for i in range(2)]
    partial = np.zeros_like(brain)
    partial[labelled] = brain[labelled]
    scored = np.setdiff1d(holds, labelled)

    job = FinetuneJob(
        image=image,
        labels=partial,
        out=tmp_path / "brain.safetensors",
        classes=named_classes(("background", "brain")),
        model=RANDOM_INIT,
        axis=0,
        steps=STEPS,
        device="cpu",
        settings=replace(FinetuneSettings(), planes="all"),
    )
    done = [e for e in run(job) if isinstance(e, Done)][-1]
    model = load_checkpoint(done.checkpoint)
    assert model.card.inference["planes"] == [0, 1, 2]
    ours = _dice(predict_volume(model, image, device="cpu"), brain, scored)
    peer = _dice(_monai_peer(image.array, partial, labelled), brain, scored)
    print(f"brain Dice on {scored.size} unlabelled slices: ours {ours:.3f}, MONAI {peer:.3f}")
    assert ours > peer + 0.02, (ours, peer)
    assert ours > 0.9, ours
