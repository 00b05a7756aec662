"""Save masks and images as NIfTI on the source scan's voxel grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.mask_info import MaskInfo, nifti_extension
from napari_fewlabel.io.nifti import is_nifti_path, write_nifti
from napari_fewlabel.io.volume import Volume


def smallest_label_dtype(max_label: int) -> np.dtype:
    """uint8, uint16 or uint32: the smallest unsigned type holding ``max_label``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise FewLabelError(f"Label value {max_label} is too large to save: use values below 2**32.")


def save_labels(
    labels: np.ndarray, *, like: Volume, path: str | Path, info: MaskInfo | None = None
) -> Path:
    """Write a label map ``(z, y, x)`` drawn on ``like`` as NIfTI on ``like``'s file grid.

    The mask is written in the source file's voxel order with its qform/sform,
    so it opens on top of the scan in ITK-SNAP, 3D Slicer or FSLeyes. The
    smallest unsigned integer type that fits is used. ``info`` (class names
    and colours, slices marked empty) goes into a header extension that our
    reader gives back (:mod:`~napari_fewlabel.io.mask_info`). The file appears
    at ``path`` complete or not at all.

    Raises
    ------
    FewLabelError
        Wrong shape, negative or non-integer labels, or a path that cannot be
        written (the message says what to do).
    """
    path = _nifti_path(path)
    labels = checked_labels(labels, like)
    extensions = []
    if info is not None and not info.is_empty:
        info.check_fits(labels.shape)
        extensions.append(nifti_extension(info))
    file_array = like.to_file_grid(labels)
    write_nifti(file_array, like, path, is_label=True, extensions=extensions)
    return path


def checked_labels(labels: np.ndarray, like: Volume) -> np.ndarray:
    """``labels`` as a whole-number unsigned array that fits ``like``, or a FewLabelError.

    Shared by every mask writer (NIfTI here, DICOM SEG in :mod:`.dicom_seg`).
    """
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise FewLabelError(
            f"The labels have shape {labels.shape} but the scan has {like.shape}: export a "
            "labels layer drawn on this scan (create it from the image, not by hand)."
        )
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise FewLabelError(
                "The labels contain fractional or non-finite values: a mask must hold "
                "whole class numbers (0 = background)."
            )
    elif labels.dtype.kind not in "iu":
        raise FewLabelError(f"Labels of type {labels.dtype} cannot be saved as a mask.")
    lo = labels.min(initial=0)
    if lo < 0:
        raise FewLabelError(
            f"The labels contain negative values ({lo}): use 0 for background and "
            "1, 2, ... for classes."
        )
    return labels.astype(smallest_label_dtype(int(labels.max(initial=0))), copy=False)


def save_image(volume: Volume, path: str | Path) -> Path:
    """Write a Volume's voxels as NIfTI on its source file grid (same dtype)."""
    path = _nifti_path(path)
    data = volume.array
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    write_nifti(volume.to_file_grid(data), volume, path, is_label=False)
    return path


def _nifti_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not is_nifti_path(path):
        raise FewLabelError(
            f"{path.name}: masks are saved as NIfTI; give a name ending in .nii.gz or .nii."
        )
    if path.is_dir():
        raise FewLabelError(f"{path} is a folder: give a file name ending in .nii.gz.")
    return path
