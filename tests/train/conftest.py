from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train.finetune import FinetuneJob, FinetuneSettings

#: A network small enough that a step takes a few hundredths of a second.
TINY_NET = UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4)
TINY_SETTINGS = FinetuneSettings(batch_labelled=2, batch_unlabelled=2, validate_every=2)


@dataclass(frozen=True)
class TinyCase:
    image: Volume
    truth: Volume
    labels: Volume  # only the labelled slices painted
    labelled: tuple[int, ...]
    classes: Any


@pytest.fixture(scope="session")
def tiny_case() -> TinyCase:
    ph = cardiac_phantom("MR", seed=0, shape=(16, 64, 64), spacing_mm=(4.0, 3.0, 3.0))
    labelled = (6, 11)
    painted = np.zeros_like(ph.labels.array)
    painted[list(labelled)] = ph.labels.array[list(labelled)]
    return TinyCase(ph.image, ph.labels, ph.labels.with_array(painted), labelled, ph.classes)


@pytest.fixture
def tiny_settings() -> FinetuneSettings:
    return TINY_SETTINGS


@pytest.fixture
def make_job(tiny_case: TinyCase, tmp_path: Path) -> Callable[..., FinetuneJob]:
    def make(**changes: Any) -> FinetuneJob:
        job = FinetuneJob(
            image=tiny_case.image,
            labels=tiny_case.labels,
            out=tmp_path / "model.safetensors",
            classes=tiny_case.classes,
            steps=4,
            device="cpu",
            settings=TINY_SETTINGS,
            architecture=TINY_NET,
            checkpoint_every_s=3600.0,
        )
        return replace(job, **changes)

    return make


def _head(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = zz**2 + yy**2 + xx**2 < 0.8
    texture = 100 * np.sin(8 * xx + 5 * yy) + 50 * rng.standard_normal(shape)
    return (inside * (500 + texture)).astype(np.int16)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> tuple[Path, ...]:
    """Two small head-like NIfTI scans to pretrain on (tests of pretraining)."""
    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for i, shape in enumerate([(24, 24, 20), (20, 28, 24)]):
        path = folder / f"head{i}.nii.gz"
        nib.save(nib.Nifti1Image(_head(shape, i), np.diag([1.5, 1.5, 2.0, 1.0])), path)
        paths.append(path)
    return tuple(paths)
