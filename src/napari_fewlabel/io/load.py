"""`load_volume` and `read_scan_header`: one entry point for every supported file type."""

from __future__ import annotations

from pathlib import Path

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.dicom import read_dicom_header, read_dicom_series
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.invesalius import (
    INVESALIUS_SUFFIX,
    is_invesalius_path,
    read_invesalius,
    read_invesalius_header,
)
from napari_fewlabel.io.itk import ITK_SUFFIXES, is_itk_path, read_itk, read_itk_scan_header
from napari_fewlabel.io.nifti import NIFTI_SUFFIXES, is_nifti_path, read_nifti, read_nifti_header
from napari_fewlabel.io.volume import Volume

SUPPORTED = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, INVESALIUS_SUFFIX, ".dcm", "a DICOM folder")


def load_volume(path: str | Path) -> Volume:
    """Read a 3D scan: NIfTI, NRRD, MetaImage, InVesalius, or a DICOM series folder.

    A single ``.dcm`` file opens the series it belongs to (its folder). The
    header is checked before any voxel is read, including the memory the
    voxels need (see :mod:`napari_fewlabel.io.limits`).

    Returns
    -------
    Volume
        Voxels in display orientation ``(z, y, x)`` with spacing, affine,
        modality and a header summary.

    Raises
    ------
    FewLabelError
        The path is missing, empty, not a supported 3D scan, corrupt, or too
        large for the memory available; the message says what to do.
    """
    path = _existing(path)
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti_path(path):
        return read_nifti(path)
    if is_itk_path(path):
        return read_itk(path)
    if is_invesalius_path(path):
        return read_invesalius(path)
    return read_dicom_series(path.parent)


def read_scan_header(path: str | Path) -> ScanHeader:
    """What :func:`load_volume` would read, from the header alone (no voxel is read).

    Raises the same :class:`FewLabelError` as :func:`load_volume` for anything
    the header shows, including a volume too large for the memory available.
    """
    path = _existing(path)
    if path.is_dir():
        return read_dicom_header(path)
    if is_nifti_path(path):
        return read_nifti_header(path)
    if is_itk_path(path):
        return read_itk_scan_header(path)
    if is_invesalius_path(path):
        return read_invesalius_header(path)
    return read_dicom_header(path.parent)


def _existing(path: str | Path) -> Path:
    """The path, when it is a folder or a non-empty file of a supported type."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FewLabelError(f"No file or folder at {path}: check the path.")
    if path.is_dir():
        return path
    if path.stat().st_size == 0:
        raise FewLabelError(f"{path} is empty (0 bytes): copy or export the file again.")
    supported = is_nifti_path(path) or is_itk_path(path) or is_invesalius_path(path)
    if not supported and path.suffix.lower() != ".dcm":
        raise FewLabelError(
            f"{path.name}: unsupported file type. Open one of {', '.join(SUPPORTED)}."
        )
    return path
