"""The real MRI -> CT head pair of ../shared/DATA.md, with labels derived from what ships.

Source (MRI, labelled): the ITK example head T1 (``KmeansTest_T1UCharRaw``,
128 x 62 x 128 voxels of 2 x 3 x 2 mm in display order) and its skull strip
(``KmeansTest_T1RawSkullStrip``). Target (CT, unlabelled for adaptation):
the InVesalius example head CT ``Cranium.inv3`` (108 x 256 x 256 of 1.5 x
0.96 x 0.96 mm) with its two threshold masks (bone, and soft tissue + bone).

Classes: 0 background, 1 head (everything in the head that is not brain:
scalp, skull, face, neck), 2 brain (intracranial contents).

How the labels are made (no expert drew them):

* MRI brain: the skull strip's non-zero voxels. MRI head: T1 above 15 (air is
  0-10 in this 8-bit image), holes filled slice by slice, the largest 3D
  component; head = head mask minus brain.
* CT head: the InVesalius soft-tissue-and-bone threshold mask, holes filled
  slice by slice, largest 3D component (this drops the scanner table).
  CT brain: in each axial slice, the convex hull of the bone mask (this
  patient has a frontal skull defect, so the skull ring is open on some
  slices and hole filling would miss the brain there; the hull bridges it);
  what is inside the hull and not bone, between -5 and 90 HU (brain; the
  window keeps out air, fat and bone), opened with a 2 mm ball, largest 3D
  component. At the skull base the hull also takes in some soft tissue of the
  face and neck between bones: the "brain" reference is loose there, and it
  is scored only on the axial slices where the brain's cross-section is at
  least half its largest, in one run around the largest (the cerebrum, from
  about the orbits up to near the vertex), ``scored_slices``; the head class
  counts on the same slices.

Both scans are resampled to 2 mm isotropic voxels (the MRI's in-plane size;
trilinear for intensities, nearest for labels) so that one 2D network sees
the head at the same scale in both; axial slices (display axis 0) are the
network's slices in both. Orientation: both are in display order with
anterior at the top of an axial slice (checked by eye); the CT's orientation
is assumed by the InVesalius reader (docs/geometry.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.io import Volume, load_volume
from napari_fewlabel.io.invesalius import read_invesalius_masks

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
T1_PATH = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
SKULL_STRIP_PATH = ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
CT_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
HEAD_CLASSES = (
    SegmentationClass(0, "background", (0, 0, 0)),
    SegmentationClass(1, "head (not brain)", (255, 200, 80)),
    SegmentationClass(2, "brain", (80, 160, 255)),
)
SPACING_MM = 2.0


@dataclass(frozen=True)
class HeadScan:
    """A head scan on the 2 mm grid with its derived labels.

    ``scored_slices`` are the axial slices where the brain reference exists.
    """

    image: Volume
    labels: Volume
    scored_slices: np.ndarray


def available() -> bool:
    return T1_PATH.exists() and SKULL_STRIP_PATH.exists() and CT_PATH.exists()


def _resample(array: np.ndarray, spacing: tuple[float, ...], order: int) -> np.ndarray:
    zoom = [s / SPACING_MM for s in spacing]
    return ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    r = [max(1, round(radius_mm / s)) for s in spacing]
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    return (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= radius_mm**2


def mri_head() -> HeadScan:
    t1 = load_volume(T1_PATH)
    strip = load_volume(SKULL_STRIP_PATH)
    head = _largest_component(_fill_per_slice(t1.array > 15))
    brain = (strip.array > 0) & head
    labels = np.where(brain, 2, np.where(head, 1, 0)).astype(np.uint8)
    image = _resample(t1.array.astype(np.float32), t1.spacing_mm, order=1)
    labels = _resample(labels, t1.spacing_mm, order=0)
    spacing = (SPACING_MM,) * 3
    return HeadScan(
        image=Volume.from_array(image, spacing, modality="MR"),
        labels=Volume.from_array(labels, spacing, modality="MR"),
        scored_slices=np.flatnonzero((labels == 2).any(axis=(1, 2))),
    )


def ct_head() -> HeadScan:
    ct, masks = read_invesalius_masks(CT_PATH)
    bone_name, tissue_name = sorted(masks, key=lambda k: masks[k].mean())
    bone, tissue = masks[bone_name], masks[tissue_name]
    spacing = ct.spacing_mm
    hu = ct.array
    head = _largest_component(_fill_per_slice(tissue | bone))
    hull = np.stack([convex_hull_image(s) if s.any() else s for s in bone])
    brain = hull & ~bone & (hu > -5) & (hu < 90) & head
    brain = _largest_component(ndimage.binary_opening(brain, structure=_ball(2.0, spacing)))
    labels = np.where(brain, 2, np.where(head, 1, 0)).astype(np.uint8)
    image = _resample(hu.astype(np.float32), spacing, order=1)
    labels = _resample(labels, spacing, order=0)
    iso = (SPACING_MM,) * 3
    area = (labels == 2).sum(axis=(1, 2))
    return HeadScan(
        image=Volume.from_array(np.round(image).astype(np.int16), iso, modality="CT"),
        labels=Volume.from_array(labels, iso, modality="CT"),
        scored_slices=_run_around_peak(area >= 0.5 * area.max(), int(np.argmax(area))),
    )


def _run_around_peak(keep: np.ndarray, peak: int) -> np.ndarray:
    """Indices of the contiguous run of True in ``keep`` that contains ``peak``."""
    lo = hi = peak
    while lo > 0 and keep[lo - 1]:
        lo -= 1
    while hi < keep.size - 1 and keep[hi + 1]:
        hi += 1
    return np.arange(lo, hi + 1)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, slices: np.ndarray) -> dict[str, float]:
    """Dice of each class on ``slices`` (axial), and their mean."""
    p, t = pred[slices], truth[slices]
    out = {}
    for cls in HEAD_CLASSES[1:]:
        a, b = p == cls.index, t == cls.index
        denom = int(a.sum() + b.sum())
        out[cls.name] = round(2 * int((a & b).sum()) / denom, 4) if denom else 1.0
    out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out
