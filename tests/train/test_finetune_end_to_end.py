"""End to end on the synthetic cardiac phantom: 2 labelled slices -> the whole volume."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_fewlabel.data.phantoms import CARDIAC_CLASSES, cardiac_phantom
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import FinetuneJob, run

LABELLED = [16, 32]  # a third and two thirds up the heart, as a reader would pick
STEPS = 300  # about 40 s of training on two CPU cores at 96x96


@pytest.mark.slow
def test_two_labelled_slices_predict_the_rest_of_the_phantom(tmp_path):
    phantom = cardiac_phantom("MR", seed=0, shape=(48, 96, 96), spacing_mm=(2.0, 2.0, 2.0))
    truth = phantom.labels.array
    painted = np.zeros_like(truth)
    painted[LABELLED] = truth[LABELLED]
    job = FinetuneJob(
        image=phantom.image,
        labels=painted,
        out=tmp_path / "heart.safetensors",
        classes=phantom.classes,
        steps=STEPS,
        device="cpu",
    )
    start = time.perf_counter()
    done = [e for e in run(job) if isinstance(e, Done)][-1]
    print(f"trained {STEPS} steps in {time.perf_counter() - start:.0f} s")
    model = load_checkpoint(done.checkpoint)
    predicted = predict_volume(model, phantom.image, device="cpu")

    unlabelled = np.setdiff1d(np.arange(truth.shape[0]), LABELLED)
    p, t = predicted[unlabelled], truth[unlabelled]
    dice = {
        c.name: 2
        * np.sum((p == c.index) & (t == c.index))
        / (np.sum(p == c.index) + np.sum(t == c.index))
        for c in CARDIAC_CLASSES[1:]
    }
    print({name: round(float(d), 3) for name, d in dice.items()})
    assert np.mean(list(dice.values())) > 0.85, dice
    assert min(dice.values()) > 0.6, dice
