"""The two other planes of a scan labelled on a few slices: labelled lines for free.

A user paints a few axial slices. Every coronal and every sagittal slice
crosses those axial slices along a line, and on that line its labels are
known: they are the painted slice's labels (sparse annotation, Cicek et al.,
MICCAI 2016). Training a 2D network on slices of all three planes, with a loss
that ignores every voxel off those lines, lets it learn how the structures
continue *across* slices, which a network that only sees axial slices cannot.

Slices of the other planes are resampled to square pixels of the labelled
plane's pixel size, so a thick-slice scan (6.5 mm slices of 0.8 mm pixels)
gives coronal slices whose anatomy has its true proportions, and each
labelled slice becomes a band of rows as thick as the slice. A labelled line
is never lost to resampling: when the plane is shrunk along the slice axis
the nearest output row of every labelled slice keeps its labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from napari_fewlabel.data.input_fit import InputFit
from napari_fewlabel.data.slice_stack import SliceStack
from napari_fewlabel.losses.dice_ce import IGNORE_INDEX

#: Fewest slices along the labelled axis for the planes across it to be worth training
#: or predicting: a coronal slice of a 4-slice scan is 4 rows tall.
MIN_SLICES_FOR_CROSS_PLANES = 8


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The two array axes of a slice taken along ``axis`` of a ``(z, y, x)`` array, in order."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    rows, cols = (a for a in range(3) if a != axis)
    return rows, cols


def plane_fit(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    axis: int,
    plane: int,
    main_fit: InputFit,
    multiple: int,
    max_side: int,
) -> InputFit:
    """How slices along ``plane`` are fitted to the network, with square pixels.

    Parameters
    ----------
    shape, spacing_mm : tuple
        The scan's ``(z, y, x)`` shape and voxel size.
    axis : int
        The labelled (main) slice axis; ``main_fit`` fits its slices.
    plane : int
        Axis whose slices to fit. ``plane == axis`` returns ``main_fit``.
    main_fit : InputFit
        The main plane's fit; its pixel size (mm) becomes the pixel size of
        this plane's resampled slices.
    multiple : int
        The network's size divisor.
    max_side : int
        Longest side of the resampled slice; a longer one is shrunk to fit
        (pixels stay square).
    """
    if plane == axis:
        return main_fit
    rows, cols = in_plane_axes(axis)
    (h, w), (rh, rw) = main_fit.slice_shape, main_fit.resized_shape
    pixel_mm = min(spacing_mm[rows] * h / rh, spacing_mm[cols] * w / rw)
    p_rows, p_cols = in_plane_axes(plane)
    sizes = [shape[p] * spacing_mm[p] / pixel_mm for p in (p_rows, p_cols)]
    shrink = min(1.0, max_side / max(sizes))
    resized = (max(1, round(sizes[0] * shrink)), max(1, round(sizes[1] * shrink)))
    input_size = (
        max(multiple, math.ceil(resized[0] / multiple) * multiple),
        max(multiple, math.ceil(resized[1] / multiple) * multiple),
    )
    return InputFit((shape[p_rows], shape[p_cols]), input_size, resized=resized)


def _nearest_sources(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output index for a nearest-neighbour resize (pixel centres aligned)."""
    return np.minimum(n_in - 1, ((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64))


def line_targets(
    labels: np.ndarray,
    axis: int,
    given: np.ndarray,
    plane: int,
    fit: InputFit,
) -> torch.Tensor:
    """Targets of every slice along ``plane``: the labelled lines, :data:`IGNORE_INDEX` elsewhere.

    Parameters
    ----------
    labels : ndarray, shape (z, y, x), int
        The label map; only its slices ``given`` along ``axis`` are read.
    axis : int
        The labelled slice axis.
    given : ndarray of int
        Slices along ``axis`` whose labels are known (painted or marked empty).
    plane : int
        Another axis than ``axis``.
    fit : InputFit
        The fit of slices along ``plane`` (:func:`plane_fit`).

    Returns
    -------
    Tensor, shape (n, H, W), int16
        ``n = labels.shape[plane]``; padding is ignored too.
    """
    if plane == axis:
        raise ValueError("line_targets is for the planes across the labelled slices")
    given = np.asarray(given, dtype=np.int64)
    known = np.take(labels, given, axis=axis)  # the given slices only: small
    p_rows, p_cols = in_plane_axes(plane)
    n_rows, n_cols = labels.shape[p_rows], labels.shape[p_cols]
    rh, rw = fit.resized_shape
    src_rows, src_cols = _nearest_sources(n_rows, rh), _nearest_sources(n_cols, rw)
    # Rows (or columns) of the resampled slice that come from a labelled slice,
    # each labelled slice keeping at least its nearest row.
    across = src_rows if p_rows == axis else src_cols
    n_out = across.size
    lookup = np.full(labels.shape[axis], -1, dtype=np.int64)
    lookup[given] = np.arange(given.size)
    which = lookup[across]  # index into ``given`` per output row/column, -1 when unlabelled
    nearest = np.minimum(n_out - 1, ((given + 0.5) * n_out / labels.shape[axis]).astype(np.int64))
    which[nearest] = np.arange(given.size)
    along = src_cols if p_rows == axis else src_rows

    # known moved to (plane, given, along) order
    moved = np.moveaxis(known, (plane, axis), (0, 1))
    out = np.full((labels.shape[plane], rh, rw), IGNORE_INDEX, dtype=np.int16)
    hit = np.flatnonzero(which >= 0)
    block = moved[:, which[hit]][:, :, along].astype(np.int16)  # (n, hits, along)
    if p_rows == axis:
        out[:, hit, :] = block
    else:
        out[:, :, hit] = block.transpose(0, 2, 1)
    (hh, ww) = fit.input_size
    top, left = (hh - rh) // 2, (ww - rw) // 2
    padded = np.full((out.shape[0], hh, ww), IGNORE_INDEX, dtype=np.int16)
    padded[:, top : top + rh, left : left + rw] = out
    return torch.from_numpy(padded)


class CrossPlane:
    """Slices along one plane across the labelled slices, with their labelled lines.

    Parameters
    ----------
    stack : SliceStack
        The scan's normalised slices along ``axis``, fitted by :func:`plane_fit`.
    targets : Tensor, shape (n, H, W), int16
        :func:`line_targets` of the same slices.

    Attributes
    ----------
    axis : int
    stack : SliceStack
    targets : Tensor
    crossing : ndarray of int
        Slices whose lines hold some structure (drawn for half the labelled
        batch, so that a small structure is not drowned in background lines).
    """

    def __init__(self, axis: int, stack: SliceStack, targets: torch.Tensor) -> None:
        if len(stack) != targets.shape[0]:
            raise ValueError("one target per slice of the stack")
        self.axis = axis
        self.stack = stack
        self.targets = targets
        self.crossing = np.flatnonzero((targets > 0).flatten(1).any(dim=1).numpy())

    def __len__(self) -> int:
        return len(self.stack)

    def labelled_batch(
        self, n: int, in_slices: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` slices (half of them crossing a structure when any does) and their targets."""
        picks = rng.integers(0, len(self), size=n)
        if self.crossing.size:
            half = n // 2
            picks[:half] = self.crossing[rng.integers(0, self.crossing.size, size=half)]
        centres = torch.from_numpy(picks)
        return self.stack.windows(centres, in_slices), self.targets[centres].long()

    def unlabelled_batch(self, n: int, in_slices: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` random slices of this plane (every voxel off the lines is unlabelled)."""
        return self.stack.windows(torch.from_numpy(rng.integers(0, len(self), size=n)), in_slices)
