"""TEMPORARY stand-in for ``napari_fewlabel.io.load_volume`` / ``save_labels``.

The real readers and writers (NIfTI, NRRD, MetaImage, DICOM) are being written
on the main branch. Until they are merged, the engine's CLI reads and writes
NIfTI through this minimal nibabel-based version, with the same signatures.
When merging: delete this file and import ``load_volume``/``save_labels`` from
``napari_fewlabel.io`` in ``napari_fewlabel/cli.py`` (the only user).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume, guess_modality

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D NIfTI file into a display-orientation :class:`Volume` (temporary stand-in)."""
    path = Path(path)
    if not path.is_file():
        raise FewLabelError(f"File {path} not found: check the path.")
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise FewLabelError(
            f"{path.name}: this build of the engine reads NIfTI (.nii, .nii.gz) only; "
            "convert the scan to NIfTI first."
        )
    try:
        img: Any = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for damaged files
        raise FewLabelError(f"Cannot read {path.name} as NIfTI ({e}): check the file.") from e
    proxy = img.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    if scaled or np.issubdtype(img.get_data_dtype(), np.floating):
        data = img.get_fdata(dtype=np.float32)
    else:
        data = np.asanyarray(proxy)  # keep integers (int16 CT stays 2 bytes per voxel)
    if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    return Volume.from_file_array(
        data,
        img.affine,
        modality=guess_modality(data),
        header={"format": "NIfTI", "path": str(path)},
        qform=(qform, int(qcode)),
        sform=(sform, int(scode)),
    )


def save_labels(labels: np.ndarray, *, like: Volume, path: str | os.PathLike[str]) -> Path:
    """Write a label map ``(z, y, x)`` as NIfTI on ``like``'s file grid (temporary stand-in)."""
    path = Path(path)
    if not path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise FewLabelError(f"Save masks as .nii.gz (or .nii), not {path.name!r}.")
    if not path.parent.is_dir():
        raise FewLabelError(
            f"Folder {path.parent} does not exist: create it or choose another --out."
        )
    dtype = np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16
    file_array = like.to_file_grid(np.asarray(labels)).astype(dtype)
    img = nib.Nifti1Image(file_array, like.grid.affine)
    grid = like.grid
    img.set_qform(grid.qform if grid.qform is not None else grid.affine, code=grid.qform_code or 1)
    img.set_sform(grid.sform if grid.sform is not None else grid.affine, code=grid.sform_code or 1)
    img.header.set_intent("label")
    nib.save(img, str(path))
    return path
