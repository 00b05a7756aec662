"""npe2 reader: NIfTI, NRRD, MetaImage, InVesalius and DICOM series -> an Image or Labels layer.

A mask (a file that says it holds labels, or integers with a handful of
values: see ``io/mask_info.py``) opens as a Labels layer on the same grid as
its scan; one saved by this plugin brings back its classes and the slices
marked empty, so a saved annotation can be reopened and trained on.

Display orientation (see ``io/volume.py``): axis 0 inferior->superior, axis 1
anterior->posterior, axis 2 right->left, so axial slices appear in the
radiological convention. ``scale`` is the voxel size in mm; ``translate`` puts
napari's world coordinates in scanner LPS mm (axis-aligned scans); the exact
affine and a header summary are in ``layer.metadata["fewlabel"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume, looks_like_mask, read_mask_info
from napari_fewlabel.io.dicom import folder_has_dicom, looks_like_dicom
from napari_fewlabel.io.invesalius import is_invesalius_path
from napari_fewlabel.io.itk import is_itk_path
from napari_fewlabel.io.nifti import is_nifti_path
from napari_fewlabel.napari._layers import image_layer_data, mask_layer_data

LayerData = list[tuple[Any, ...]]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], LayerData] | None:
    """Return :func:`read_scan` if ``path`` is something we read, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None  # a stack of files is not a series we can place in 3D
        path = path[0]
    p = Path(path)
    if p.is_dir():
        return read_scan if folder_has_dicom(p) else None
    if is_nifti_path(p) or is_itk_path(p) or is_invesalius_path(p):
        return read_scan
    if p.suffix.lower() == ".dcm" and looks_like_dicom(p):
        return read_scan
    return None


def read_scan(path: str | list[str]) -> LayerData:
    """Read one scan; on bad input show a notification saying what to do."""
    from napari.utils.notifications import show_error, show_info

    target = Path(path[0] if isinstance(path, list) else path)
    try:
        volume = load_volume(target)
    except FewLabelError as exc:
        show_error(str(exc))
        return [(None,)]  # napari's "handled, nothing to add" sentinel
    others = volume.header.get("other_series")
    if others:
        show_info(
            f"Opened the largest series in {target.name} "
            f"({volume.header.get('files', '?')} images). Also found: " + "; ".join(others)
        )
    name = target.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".inv3", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if looks_like_mask(volume, target):
        return [mask_layer_data(volume, name, read_mask_info(target))]
    return [image_layer_data(volume, name)]
