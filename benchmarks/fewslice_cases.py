"""The real scans of ``fewslice_suite.py``: image, reference labels and how they were made.

Every case is a :class:`Case` in display orientation ``(z, y, x)`` (axis 0 axial,
inferior to superior; docs/geometry.md) whose labelled axis is axis 0. Scans
wider than ``max_side`` voxels in-plane are reduced by an integer factor in y and
x only (never along axis 0): block mean for the image, block majority for the
labels, the affine and spacing scaled to match (:func:`downsample_in_plane`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from annotation_efficiency import CLASS_NAMES, mni_volume
from head_pair import CT_PATH, SKULL_STRIP_PATH, T1_PATH
from pretraining import PYRADIOMICS, evaluation_volume

from napari_fewlabel.infer.lungs import segment_lungs
from napari_fewlabel.io import Volume, load_volume
from napari_fewlabel.io.invesalius import read_invesalius_masks


@dataclass(frozen=True, eq=False)
class Case:
    """One benchmark scan.

    Attributes
    ----------
    name : str
    image : Volume
        The scan, ``(z, y, x)``, after in-plane downsampling.
    truth : ndarray of uint8, shape (z, y, x)
        Reference labels on the same grid (0 background).
    class_names : tuple of str
        Name of each label value, ``class_names[0]`` the background.
    description : str
        One line: the scan and how its reference labels were derived.
    in_plane_factor : int
        The in-plane downsampling factor that was applied (1: none).
    """

    name: str
    image: Volume
    truth: np.ndarray
    class_names: tuple[str, ...]
    description: str
    in_plane_factor: int = 1


# ----------------------------------------------------------------- downsampling
def in_plane_factor(shape: tuple[int, int, int], max_side: int) -> int:
    """The smallest integer factor that brings both in-plane sides to at most ``max_side``."""
    return max(1, math.ceil(max(shape[1], shape[2]) / max_side))


def _in_plane_blocks(array: np.ndarray, factor: int) -> np.ndarray:
    """``(z, y, x)`` -> ``(z, y // f, f, x // f, f)``; the edge that fills no block is dropped."""
    z, y, x = array.shape[0], array.shape[1] // factor, array.shape[2] // factor
    return array[:, : y * factor, : x * factor].reshape(z, y, factor, x, factor)


def downsample_in_plane(
    image: Volume, truth: np.ndarray, num_classes: int, max_side: int
) -> tuple[Volume, np.ndarray, int]:
    """Reduce y and x by one integer factor so that neither exceeds ``max_side``.

    The image is block-averaged (float32); each label block takes its most
    frequent value (ties go to the lower label). The new affine maps a new
    voxel to the centre of its block, so the scan stays where it was in world
    coordinates.

    Returns
    -------
    image : Volume
    truth : ndarray of uint8
    factor : int
    """
    factor = in_plane_factor(image.shape, max_side)
    if factor == 1:
        return image, truth, 1
    pixels = _in_plane_blocks(image.array, factor).mean(axis=(2, 4), dtype=np.float64)
    label_blocks = _in_plane_blocks(truth, factor)
    counts = np.stack([(label_blocks == c).sum(axis=(2, 4)) for c in range(num_classes)])
    labels = counts.argmax(axis=0).astype(np.uint8)
    half = (factor - 1) / 2  # voxel 0 of the new grid sits at the centre of block 0
    scale = np.array([[1.0, 0, 0, 0], [0, factor, 0, half], [0, 0, factor, half], [0, 0, 0, 1.0]])
    reduced = Volume.from_file_array(
        pixels.astype(np.float32),
        image.affine @ scale,
        modality=image.modality,
        header={**image.header, "downsampled_in_plane_by": factor},
    )
    if reduced.shape != labels.shape:  # the display affine is already in display order
        raise RuntimeError(f"downsampling reoriented the scan: {reduced.shape} vs {labels.shape}")
    return reduced, labels, factor


# ------------------------------------------------------------------ the cases
#: Seeds of the deep grey nuclei in MNI RAS+ mm (x > 0 is the patient's RIGHT).
DEEP_GREY_SEEDS_RAS_MM = {
    "left caudate": (-13.0, 12.0, 10.0),
    "right caudate": (13.0, 12.0, 10.0),
    "left putamen": (-25.0, 2.0, 0.0),
    "right putamen": (25.0, 2.0, 0.0),
    "left thalamus": (-11.0, -18.0, 7.0),
    "right thalamus": (11.0, -18.0, 7.0),
}
#: A grey-matter voxel farther than this from every seed is not a nucleus.
DEEP_GREY_RADIUS_MM = 12.0
#: The box (RAS+ mm, ``(low, high)`` per axis) that holds the basal ganglia and thalami.
DEEP_GREY_BOX_RAS_MM = ((-35.0, 35.0), (-35.0, 30.0), (-12.0, 25.0))


def world_ras_mm(image: Volume) -> np.ndarray:
    """RAS+ mm of every voxel centre, shape ``(3, z, y, x)``, from ``image.affine``."""
    index = np.indices(image.shape, dtype=np.float64).reshape(3, -1)
    ras = image.affine[:3, :3] @ index + image.affine[:3, 3:4]
    return ras.reshape(3, *image.shape)


def _mni_gm_wm() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image, truth = mni_volume(2)
    return (
        image,
        truth,
        CLASS_NAMES,
        "MNI152 2009c T1 at 2 mm; GM/WM = the larger of the two probability maps where "
        "max(GM, WM) >= 0.5",
    )


def _mni_deep_grey() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image, tissue = mni_volume(2)
    ras = world_ras_mm(image)
    in_box = np.ones(image.shape, dtype=bool)
    for axis, (low, high) in enumerate(DEEP_GREY_BOX_RAS_MM):
        in_box &= (ras[axis] >= low) & (ras[axis] <= high)
    seeds = np.array(list(DEEP_GREY_SEEDS_RAS_MM.values()))  # (6, 3)
    distance = np.linalg.norm(ras[None] - seeds[:, :, None, None, None], axis=1)  # (6, z, y, x)
    nearest = distance.argmin(axis=0)
    near_enough = distance.min(axis=0) <= DEEP_GREY_RADIUS_MM
    keep = (tissue == 1) & in_box & near_enough
    truth = np.where(keep, nearest + 1, 0).astype(np.uint8)
    return (
        image,
        truth,
        ("background", *DEEP_GREY_SEEDS_RAS_MM),
        "MNI152 2009c T1 at 2 mm; deep grey nuclei = grey-matter label inside a basal-ganglia "
        f"box, each voxel given to the nearest of six MNI seeds within {DEEP_GREY_RADIUS_MM:g} mm",
    )


def _itk_head_brain() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image = load_volume(T1_PATH)
    truth = (np.asarray(load_volume(SKULL_STRIP_PATH).array) > 0).astype(np.uint8)
    return (
        image,
        truth,
        ("background", "brain"),
        "ITK example head T1 (KmeansTest_T1UCharRaw); brain = KmeansTest_T1RawSkullStrip > 0",
    )


def _brain_tumour() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image, truth, class_names = evaluation_volume("brain-tumour")
    return (
        image,
        truth,
        class_names,
        "pyradiomics brain1 MRI (6.5 mm slices); tumour = brain1_label > 0",
    )


def _lung_tumour() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image, truth, class_names = evaluation_volume("lung-tumour")
    return image, truth, class_names, "pyradiomics lung2 CT; tumour = lung2_label > 0"


def _lungs_right_left() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image = load_volume(PYRADIOMICS / "lung1_image.nrrd")
    lungs = segment_lungs(image)  # 1 right, 2 left; at full resolution
    return (
        image,
        lungs.labels.astype(np.uint8),
        ("background", "right lung", "left lung"),
        "pyradiomics lung1 CT; right/left lung from the classical segment_lungs "
        "(infer/lungs.py) at full resolution",
    )


def _head_ct() -> tuple[Volume, np.ndarray, tuple[str, ...], str]:
    image, masks = read_invesalius_masks(CT_PATH)
    # The project's two threshold masks: bone, and soft tissue + bone (bone lies inside it).
    bone_name, tissue_name = sorted(masks, key=lambda name: masks[name].sum())
    bone, tissue_and_bone = masks[bone_name], masks[tissue_name]
    truth = np.where(bone, 1, np.where(tissue_and_bone, 2, 0)).astype(np.uint8)
    return (
        image,
        truth,
        ("background", "bone", "soft tissue"),
        f"InVesalius example head CT (Cranium.inv3); bone = mask {bone_name!r}, "
        f"soft tissue = mask {tissue_name!r} minus bone (threshold masks, scanner table included)",
    )


#: Case name -> loader giving (image, truth, class names, description) at full resolution.
CASE_LOADERS: dict[str, Callable[[], tuple[Volume, np.ndarray, tuple[str, ...], str]]] = {
    "mni-gm-wm": _mni_gm_wm,
    "mni-deep-grey": _mni_deep_grey,
    "itk-head-brain": _itk_head_brain,
    "brain-tumour": _brain_tumour,
    "lung-tumour": _lung_tumour,
    "lungs-lr": _lungs_right_left,
    "head-ct": _head_ct,
}


def load_case(name: str, max_side: int = 128, cache: Path | None = None) -> Case:
    """Load case ``name`` and reduce it in-plane to at most ``max_side`` voxels a side.

    With ``cache`` (a folder), the case is read from ``<cache>/<name>-<max_side>.npz``
    when that file exists and written there otherwise, so a machine without the
    source data (a GPU machine, say) can run the suite on cases made elsewhere.
    """
    if name not in CASE_LOADERS:
        raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASE_LOADERS)}")
    cached = None if cache is None else cache / f"{name}-{max_side}.npz"
    if cached is not None and cached.is_file():
        return read_case(cached)
    image, truth, class_names, description = CASE_LOADERS[name]()
    image, truth, factor = downsample_in_plane(
        image, np.asarray(truth, dtype=np.uint8), len(class_names), max_side
    )
    case = Case(name, image, truth, class_names, description, factor)
    if cached is not None:
        write_case(case, cached)
    return case


def write_case(case: Case, path: Path) -> None:
    """Save ``case`` as one compressed ``.npz`` (written to a temporary file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    about = {
        "name": case.name,
        "class_names": list(case.class_names),
        "description": case.description,
        "in_plane_factor": case.in_plane_factor,
        "geometry": case.image.to_metadata(),
    }
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(
        partial, image=case.image.array, truth=case.truth, about=np.array(json.dumps(about))
    )
    partial.replace(path)


def read_case(path: Path) -> Case:
    """The case :func:`write_case` saved."""
    with np.load(path, allow_pickle=False) as saved:
        about = json.loads(str(saved["about"]))
        image = Volume.from_metadata(saved["image"], about["geometry"])
        truth = saved["truth"]
    return Case(
        about["name"],
        image,
        truth,
        tuple(about["class_names"]),
        about["description"],
        about["in_plane_factor"],
    )


def describe(case: Case) -> dict[str, object]:
    """Shape, spacing and voxel counts per class (whole volume, and slices holding each class)."""
    counts = {
        name: {
            "voxels": int((case.truth == c).sum()),
            "slices": int((case.truth == c).any(axis=(1, 2)).sum()),
        }
        for c, name in enumerate(case.class_names)
        if c > 0
    }
    return {
        "case": case.name,
        "shape": list(case.image.shape),
        "spacing_mm": [round(s, 3) for s in case.image.spacing_mm],
        "modality": case.image.modality,
        "in_plane_factor": case.in_plane_factor,
        "classes": counts,
        "description": case.description,
    }
