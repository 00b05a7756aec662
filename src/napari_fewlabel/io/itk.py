"""NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) through SimpleITK.

ITK reports geometry in LPS+; it is turned into the RAS+ affine that the rest
of the package uses by flipping the first two rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import (
    RAS_FROM_LPS,
    Modality,
    Volume,
    guess_modality,
    parse_modality,
)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")

# Refuse headers that declare absurd sizes before ITK tries to allocate them.
_MAX_VOXELS = 2**31


def is_itk_path(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def lps_affine(image: sitk.Image) -> np.ndarray:
    """``(i, j, k, 1)`` -> LPS+ mm affine of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing  # scales columns: column i is axis i's step
    affine[:3, 3] = image.GetOrigin()
    return affine


def file_array(image: sitk.Image) -> np.ndarray:
    """Voxels in ``(i, j, k)`` order (ITK's array view is ``(k, j, i)``)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def read_itk(path: Path) -> Volume:
    """Read a 3D NRRD or MetaImage file into a display-orientation :class:`Volume`."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = reader.GetSize()
        if int(np.prod(size, dtype=np.float64)) > _MAX_VOXELS:
            raise FewLabelError(
                f"{path.name} declares {size} voxels, more than this reader accepts: "
                "check the header, or crop the volume first."
            )
        image = reader.Execute()
    except FewLabelError:
        raise
    except Exception as exc:  # ITK raises RuntimeError for any parse failure
        first = str(exc).strip().splitlines()
        reason = next(
            (ln for ln in first if "ERROR" in ln or "rror" in ln), first[0] if first else ""
        )
        raise FewLabelError(
            f"Could not read {path.name} ({reason.strip()[:200]}). The file may be truncated, "
            "or its header may point to a missing data file: export it again."
        ) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise FewLabelError(
            f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a vector or RGB image): open a scalar 3D scan."
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise FewLabelError(
            f"{path.name} is {image.GetDimension()}D (size {image.GetSize()}); a 3D scan is "
            "needed. Extract one 3D volume first."
        )
    data = file_array(image)
    info: dict[str, Any] = {
        "format": "NRRD" if path.suffix.lower() in (".nrrd", ".nhdr") else "MetaImage",
        "path": str(path),
        "dtype": str(data.dtype),
    }
    modality = _modality_from_metadata(reader) or guess_modality(data)
    return Volume.from_file_array(
        data, RAS_FROM_LPS @ lps_affine(image), modality=modality, header=info
    )


def _modality_from_metadata(reader: sitk.ImageFileReader) -> Modality | None:
    for key in reader.GetMetaDataKeys():
        if key.lower() in ("modality", "0008|0060"):
            return parse_modality(reader.GetMetaData(key))
    return None
