"""`ScanHeader`: what a scan's header says, read without its voxels.

``fewlabel info`` and the size check need the shape, type and geometry of a
scan before deciding to read it: a header is a few bytes, the voxels can be
gigabytes. Each reader module has a ``read_*_header`` function returning one
of these; :func:`napari_fewlabel.io.load.read_scan_header` picks the right one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_fewlabel.io.volume import (
    FileGrid,
    Modality,
    display_transform,
    spacing_from_affine,
)


@dataclass(frozen=True, eq=False)
class ScanHeader:
    """A scan's header: shape, voxel type, geometry, and the memory its voxels need.

    Attributes
    ----------
    path : str
    format : str
        "NIfTI", "NRRD", "MetaImage", "DICOM" or "InVesalius".
    file_shape : tuple of int
        Voxels along the file's axes ``(i, j, k)``.
    dtype : str
        Stored voxel type (DICOM: as decoded before narrowing).
    affine : ndarray, shape (4, 4)
        ``(i, j, k, 1)`` -> RAS+ mm, as :class:`~napari_fewlabel.io.Volume` would get.
    read_bytes : int
        Memory the reader needs at its peak to load the voxels.
    modality : {"CT", "MR"} or None
        From the metadata; None when only the intensities could tell.
    details : mapping
        Format-specific header facts (NIfTI xform codes, DICOM series tags).
    """

    path: str
    format: str
    file_shape: tuple[int, int, int]
    dtype: str
    affine: np.ndarray
    read_bytes: int
    modality: Modality | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def display_geometry(self) -> tuple[tuple[int, int, int], np.ndarray]:
        """``(z, y, x)`` shape and ``(z, y, x, 1)`` -> RAS+ affine of the loaded volume."""
        _, display_affine = display_transform(self.file_shape, self.affine)
        return self.file_grid().display_shape(), display_affine

    def file_grid(self) -> FileGrid:
        """The file's voxel grid, as the loaded :class:`~napari_fewlabel.io.Volume` has it."""
        to_display, _ = display_transform(self.file_shape, self.affine)
        return FileGrid(shape=self.file_shape, affine=self.affine, to_display=to_display)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along the display axes ``(z, y, x)``."""
        return spacing_from_affine(self.display_geometry()[1])
