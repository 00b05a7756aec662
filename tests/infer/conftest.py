"""Real chest CTs and their lung masks, segmented once per test session."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

import real_data
from napari_fewlabel.infer.lungs import LungMasks, segment_lungs
from napari_fewlabel.io import Volume, load_volume


@dataclass(frozen=True, eq=False)
class SegmentedChest:
    name: str
    scan: Volume
    lungs: LungMasks
    lesion: np.ndarray  # bool (z, y, x): the nodule / tumour label shipped with the scan


CHESTS = {
    "lung1": (real_data.lung1_image, real_data.lung1_label),
    "lung2": (real_data.lung2_image, real_data.lung2_label),
}


@functools.cache
def _segmented(name: str) -> SegmentedChest:
    image, label = CHESTS[name]
    scan = load_volume(image())
    lesion = load_volume(label()).array > 0
    return SegmentedChest(name, scan, segment_lungs(scan), lesion)


@pytest.fixture(params=sorted(CHESTS))
def segmented_chest(request: pytest.FixtureRequest) -> SegmentedChest:
    """Each real chest CT in turn, with its lungs."""
    return _segmented(request.param)


@pytest.fixture
def lung1() -> SegmentedChest:
    return _segmented("lung1")


@pytest.fixture
def lung2() -> SegmentedChest:
    return _segmented("lung2")
