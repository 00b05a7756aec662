"""NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) through SimpleITK.

ITK reports geometry in LPS+; it is turned into the RAS+ affine that the rest
of the package uses by flipping the first two rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.itk_header import parse_itk_header
from napari_fewlabel.io.limits import check_volume_size
from napari_fewlabel.io.volume import (
    RAS_FROM_LPS,
    Modality,
    Volume,
    guess_modality,
    parse_modality,
)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")

# SimpleITK pixel IDs of scalar images -> numpy type, for the header-only summary.
_PIXEL_DTYPES = {
    sitk.sitkInt8: "int8",
    sitk.sitkUInt8: "uint8",
    sitk.sitkInt16: "int16",
    sitk.sitkUInt16: "uint16",
    sitk.sitkInt32: "int32",
    sitk.sitkUInt32: "uint32",
    sitk.sitkInt64: "int64",
    sitk.sitkUInt64: "uint64",
    sitk.sitkFloat32: "float32",
    sitk.sitkFloat64: "float64",
}


def is_itk_path(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def lps_affine(image: sitk.Image) -> np.ndarray:
    """``(i, j, k, 1)`` -> LPS+ mm affine of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return _lps_affine(direction, image.GetSpacing(), image.GetOrigin())


def _lps_affine(
    direction: np.ndarray, spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    affine = np.eye(4)
    # Scales columns: column i is axis i's step.
    affine[:3, :3] = direction * np.asarray(spacing, dtype=np.float64)
    affine[:3, 3] = origin
    return affine


def file_array(image: sitk.Image) -> np.ndarray:
    """Voxels in ``(i, j, k)`` order (ITK's array view is ``(k, j, i)``)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def read_itk_scan_header(path: Path) -> ScanHeader:
    """The header of a 3D NRRD or MetaImage file; no voxel is read."""
    reader, read_bytes = _open(path)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64)
    n = reader.GetDimension()
    affine = _lps_affine(
        direction.reshape(n, n)[:3, :3], reader.GetSpacing()[:3], reader.GetOrigin()[:3]
    )
    size = reader.GetSize()
    return ScanHeader(
        path=str(path),
        format=_format(path),
        file_shape=(size[0], size[1], size[2]),
        dtype=str(np.dtype(_PIXEL_DTYPES.get(reader.GetPixelID(), "float64"))),
        affine=RAS_FROM_LPS @ affine,
        read_bytes=read_bytes,
        modality=_modality_from_metadata(reader),
    )


def read_itk(path: Path) -> Volume:
    """Read a 3D NRRD or MetaImage file into a display-orientation :class:`Volume`."""
    reader, _ = _open(path)
    try:
        image = reader.Execute()
    except MemoryError:
        raise
    except Exception as exc:  # ITK raises RuntimeError for any decoding failure
        raise _unreadable(path, exc) from exc
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]  # _open let only a single time point through
    data = file_array(image)
    info: dict[str, Any] = {"format": _format(path), "path": str(path), "dtype": str(data.dtype)}
    modality = _modality_from_metadata(reader) or guess_modality(data)
    return Volume.from_file_array(
        data, RAS_FROM_LPS @ lps_affine(image), modality=modality, header=info
    )


def _open(path: Path) -> tuple[sitk.ImageFileReader, int]:
    """A reader that has read and accepted the header, and the bytes reading the voxels needs.

    Our own parser sees the header first (ITK can crash or hang on forged ones,
    see :mod:`~napari_fewlabel.io.itk_header`), then the size is checked, then
    ITK reads the header for geometry. No voxel is read here.
    """
    declared = parse_itk_header(path)
    # ITK's image and the numpy copy of it; a 4D file's single time point is copied once more.
    copies = 3 if len(declared.sizes) == 4 else 2
    read_bytes = check_volume_size(
        declared.sizes,
        copies * declared.components * declared.dtype.itemsize,
        path.name,
        dtype=str(declared.dtype),
    )
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO" if declared.format == "NRRD" else "MetaImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if reader.GetNumberOfComponents() != 1:
        raise FewLabelError(
            f"{path.name} has {reader.GetNumberOfComponents()} components per voxel "
            "(a vector or RGB image): open a scalar 3D scan."
        )
    size = reader.GetSize()
    if not (reader.GetDimension() == 3 or (reader.GetDimension() == 4 and size[3] == 1)):
        raise FewLabelError(
            f"{path.name} is {reader.GetDimension()}D (size {size}); a 3D scan is "
            "needed. Extract one 3D volume first."
        )
    return reader, read_bytes


def _unreadable(path: Path, exc: Exception) -> FewLabelError:
    lines = str(exc).strip().splitlines()
    reason = next((ln for ln in lines if "rror" in ln), lines[0] if lines else type(exc).__name__)
    return FewLabelError(
        f"Could not read {path.name} ({reason.strip()[:200]}). The file may be truncated, "
        "or its header may point to a missing data file: export it again."
    )


def _format(path: Path) -> str:
    return "NRRD" if path.suffix.lower() in (".nrrd", ".nhdr") else "MetaImage"


def _modality_from_metadata(reader: sitk.ImageFileReader) -> Modality | None:
    for key in reader.GetMetaDataKeys():
        if key.lower() in ("modality", "0008|0060"):
            return parse_modality(reader.GetMetaData(key))
    return None
