"""`load_volume`: one entry point for every supported file type."""

from __future__ import annotations

from pathlib import Path

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.dicom import read_dicom_series
from napari_fewlabel.io.invesalius import INVESALIUS_SUFFIX, is_invesalius_path, read_invesalius
from napari_fewlabel.io.itk import ITK_SUFFIXES, is_itk_path, read_itk
from napari_fewlabel.io.nifti import NIFTI_SUFFIXES, is_nifti_path, read_nifti
from napari_fewlabel.io.volume import Volume

SUPPORTED = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, INVESALIUS_SUFFIX, ".dcm", "a DICOM folder")


def load_volume(path: str | Path) -> Volume:
    """Read a 3D scan: NIfTI, NRRD, MetaImage, InVesalius, or a DICOM series folder.

    A single ``.dcm`` file opens the series it belongs to (its folder).

    Returns
    -------
    Volume
        Voxels in display orientation ``(z, y, x)`` with spacing, affine,
        modality and a header summary.

    Raises
    ------
    FewLabelError
        The path is missing, empty, not a supported 3D scan, or corrupt; the
        message says what to do.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FewLabelError(f"No file or folder at {path}: check the path.")
    if path.is_dir():
        return read_dicom_series(path)
    if path.stat().st_size == 0:
        raise FewLabelError(f"{path} is empty (0 bytes): copy or export the file again.")
    if is_nifti_path(path):
        return read_nifti(path)
    if is_itk_path(path):
        return read_itk(path)
    if is_invesalius_path(path):
        return read_invesalius(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom_series(path.parent)
    raise FewLabelError(f"{path.name}: unsupported file type. Open one of {', '.join(SUPPORTED)}.")
