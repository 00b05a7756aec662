"""Volumes in and out: NIfTI, NRRD, MetaImage, DICOM series. No torch, no Qt.

>>> from napari_fewlabel.io import load_volume, save_labels
>>> scan = load_volume("scan.nii.gz")              # doctest: +SKIP
>>> save_labels(mask, like=scan, path="mask.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.load import SUPPORTED, load_volume, read_scan_header
from napari_fewlabel.io.mask_info import MaskInfo, looks_like_mask, read_mask_info
from napari_fewlabel.io.save import save_image, save_labels, smallest_label_dtype
from napari_fewlabel.io.volume import (
    DISPLAY_AXCODES,
    METADATA_KEY,
    FileGrid,
    Modality,
    Volume,
    guess_modality,
)

__all__ = [
    "DISPLAY_AXCODES",
    "METADATA_KEY",
    "SUPPORTED",
    "FileGrid",
    "MaskInfo",
    "Modality",
    "ScanHeader",
    "Volume",
    "guess_modality",
    "load_volume",
    "looks_like_mask",
    "read_mask_info",
    "read_scan_header",
    "save_image",
    "save_labels",
    "smallest_label_dtype",
]
