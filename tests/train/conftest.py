from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
