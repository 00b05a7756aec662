"""A volume as a stack of normalised slices at the model's input size (for training).

The volume is normalised once, its slice axis moved first, and every slice
fitted to the input size (:mod:`napari_fewlabel.data.input_fit`), giving a
tensor ``(n, H, W)``. A training sample is a *window* of ``k`` adjacent slices
around a centre slice (2.5D input), repeated at the volume's ends.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_fewlabel.data.input_fit import InputFit
from napari_fewlabel.data.normalization import IntensityMapping

#: Slices fitted to the input size per chunk (bounds the float32 copy made at a time).
_CHUNK = 32


class SliceStack:
    """Normalised slices of one volume along one axis, fitted to the model input.

    Parameters
    ----------
    array : ndarray, shape (z, y, x)
        Raw voxel values.
    axis : int
        Slice axis of ``array``.
    mapping : IntensityMapping
        Fitted normalisation of this volume.
    input_size : tuple of int
        ``(H, W)`` of the network input.
    fit : InputFit, optional
        How each slice is resized and padded (e.g. to square the pixels of a
        coronal slice, :func:`~napari_fewlabel.data.planes.plane_fit`); default:
        shrink to ``input_size`` with the aspect ratio kept.

    Attributes
    ----------
    slices : Tensor, shape (n, H, W), float32
    fit : InputFit
    """

    def __init__(
        self,
        array: np.ndarray,
        axis: int,
        mapping: IntensityMapping,
        input_size: tuple[int, int],
        fit: InputFit | None = None,
    ) -> None:
        moved = np.moveaxis(array, axis, 0)
        self.fit = fit or InputFit((moved.shape[1], moved.shape[2]), input_size)
        self.pad_value = float(mapping.background)
        chunks = []
        for start in range(0, moved.shape[0], _CHUNK):
            block = torch.from_numpy(mapping(moved[start : start + _CHUNK]))
            chunks.append(self.fit.images_to_input(block[:, None], self.pad_value)[:, 0])
        self.slices = torch.cat(chunks)

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def windows(self, centres: torch.Tensor, in_slices: int) -> torch.Tensor:
        """Windows of ``in_slices`` adjacent slices, ``(B, in_slices, H, W)``.

        Parameters
        ----------
        centres : Tensor, shape (B,), int64
            Centre slice indices.
        in_slices : int
            Odd window length; slices beyond the ends repeat the end slice.
        """
        half = in_slices // 2
        offsets = torch.arange(-half, half + 1)
        index = (centres[:, None] + offsets[None, :]).clamp(0, len(self) - 1)
        return self.slices[index]


def fit_labels(labels: np.ndarray, axis: int, indices: np.ndarray, fit: InputFit) -> torch.Tensor:
    """Labels of the slices ``indices`` along ``axis`` at the input size, ``(m, H, W)`` int64.

    The padding around a shrunk slice is background (it is outside the scan).
    """
    taken = np.take(labels, indices, axis=axis)
    moved = np.ascontiguousarray(np.moveaxis(taken, axis, 0)).astype(np.int64)
    return fit.labels_to_input(torch.from_numpy(moved), pad_value=0)
