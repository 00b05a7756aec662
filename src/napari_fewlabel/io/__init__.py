"""Volumes in and out: NIfTI, NRRD, MetaImage, DICOM series. No torch, no Qt."""

from __future__ import annotations

from napari_fewlabel.io.volume import DISPLAY_AXCODES, METADATA_KEY, FileGrid, Modality, Volume

__all__ = ["DISPLAY_AXCODES", "METADATA_KEY", "FileGrid", "Modality", "Volume"]
