"""Real chest CTs (lung1, lung2) with their lung masks, segmented once per test session."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

import real_data
from napari_fewlabel.infer.lungs import LungMasks, segment_lungs
from napari_fewlabel.io import Volume, load_volume


@dataclass(frozen=True, eq=False)
class SegmentedChest:
    name: str
    scan: Volume
    lungs: LungMasks
    lesion: np.ndarray  # bool (z, y, x): the nodule / tumour label shipped with the scan


_FILES = {
    "lung1": (real_data.lung1_image, real_data.lung1_label),
    "lung2": (real_data.lung2_image, real_data.lung2_label),
}
CHEST_NAMES = tuple(sorted(_FILES))


@functools.cache
def segmented_chest(name: str) -> SegmentedChest:
    """The scan, its lungs and its lesion label (skips the test when the data is missing)."""
    image, label = _FILES[name]
    scan = load_volume(image())
    lesion = load_volume(label()).array > 0
    return SegmentedChest(name, scan, segment_lungs(scan), lesion)
