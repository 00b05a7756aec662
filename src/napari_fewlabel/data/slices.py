"""Which slices the user labelled, and along which axis.

The rule (DESIGN.md): a slice with any nonzero voxel counts as fully labelled
and 0 on it means background; a slice with only zeros is unlabelled, unless
the user marked it empty: checked, and holding none of the structures
(:func:`check_empty_slices`). Painting needs no "labelled" flag; only the
empty slices, which paint cannot express, are listed apart.

The slice axis is the one along which the labelled slices are *separated by
unlabelled ones*: painting a few axial slices leaves gaps along ``z`` but gives
one contiguous run of rows along ``y`` and ``x``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from napari_fewlabel.errors import FewLabelError

AXIS_NAMES = ("z (axial)", "y (coronal)", "x (sagittal)")


def labelled_slices(labels: np.ndarray, axis: int) -> np.ndarray:
    """Indices of slices along ``axis`` that contain any nonzero label.

    Parameters
    ----------
    labels : ndarray, shape (z, y, x)
        Integer label map.
    axis : int
        0, 1 or 2.

    Returns
    -------
    ndarray of int
        Sorted slice indices.
    """
    _check_axis(axis)
    others = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(np.any(labels != 0, axis=others))


def unlabelled_slices(labels: np.ndarray, axis: int) -> np.ndarray:
    """Indices of slices along ``axis`` whose labels are all zero."""
    mask = np.ones(labels.shape[axis], dtype=bool)
    mask[labelled_slices(labels, axis)] = False
    return np.flatnonzero(mask)


@dataclass(frozen=True)
class SliceAxisChoice:
    """The inferred slice axis and a sentence saying why.

    Attributes
    ----------
    axis : int
        0 (z, axial), 1 (y, coronal) or 2 (x, sagittal) of the ``(z, y, x)`` array.
    reason : str
        Human-readable explanation, shown to the user.
    """

    axis: int
    reason: str


def infer_slice_axis(labels: np.ndarray) -> SliceAxisChoice:
    """Guess along which axis the user painted slices.

    The axis with the most separate runs of labelled slices wins (labelled
    slices separated by unlabelled ones); ties go to the axis with the fewest
    labelled slices, then to the lowest axis (axial first).

    Parameters
    ----------
    labels : ndarray, shape (z, y, x)

    Raises
    ------
    FewLabelError
        When no voxel is labelled.
    """
    nonzero = labels != 0
    if not nonzero.any():
        raise FewLabelError(
            "No labelled slice found: every label is 0. Paint at least one slice "
            "(any nonzero value on a slice marks the whole slice as labelled)."
        )
    stats = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.any(nonzero, axis=others)
        runs = int(np.count_nonzero(np.diff(present.astype(np.int8)) == 1) + present[0])
        stats.append((-runs, int(present.sum()), axis))
    neg_runs, count, axis = min(stats)
    runs = -neg_runs
    if runs > 1:
        why = f"its {count} labelled slices form {runs} groups separated by unlabelled slices"
    else:
        why = f"it has the fewest labelled slices ({count})"
    return SliceAxisChoice(
        axis=axis,
        reason=f"Slice axis {axis} = {AXIS_NAMES[axis]}: {why}. Override with --axis.",
    )


def check_one_axis(labels: np.ndarray, axis: int) -> None:
    """Refuse labels painted along two axes (say axial slices and a coronal one).

    Every slice along ``axis`` that holds paint counts as fully labelled, so a
    coronal slice painted beside a few axial ones would turn every axial slice
    it crosses into a "labelled" slice that is background except for one
    line: a silent wrong result. Three or more labelled slices whose paint
    lies on one and the same row (or column) are that pattern.

    Raises
    ------
    FewLabelError
        Naming both axes and what to do.
    """
    _check_axis(axis)
    rows_axis, cols_axis = (a for a in range(3) if a != axis)
    for other, reduce_over in ((rows_axis, cols_axis), (cols_axis, rows_axis)):
        # For every slice along ``axis``: the indices along ``other`` that hold paint.
        painted = np.any(labels != 0, axis=reduce_over)  # (n along axis, n along other) in order
        if axis > other:
            painted = painted.T
        counts = painted.sum(axis=1)
        single = np.flatnonzero(counts == 1)
        if single.size < 3:
            continue
        where = painted[single].argmax(axis=1)
        values, n = np.unique(where, return_counts=True)
        if n.max() >= 3:
            index = int(values[n.argmax()])
            raise FewLabelError(
                f"The labels look painted along two axes: {int(n.max())} slices along "
                f"{AXIS_NAMES[axis]} hold paint only on the line {AXIS_NAMES[other].split()[0]}"
                f" = {index}, as a slice painted along {AXIS_NAMES[other]} would. Paint "
                "slices along one axis only: erase the slices painted along the other."
            )


def check_empty_slices(labels: np.ndarray, axis: int, marked: Iterable[int]) -> np.ndarray:
    """The slices marked empty, sorted and checked: on the volume, with nothing painted.

    Raises
    ------
    FewLabelError
        A marked slice is outside the volume, or has painted voxels.
    """
    _check_axis(axis)
    n_slices = labels.shape[axis]
    empty = np.unique(np.asarray(list(marked), dtype=np.int64))
    outside = [int(i) for i in empty if not 0 <= i < n_slices]
    if outside:
        raise FewLabelError(
            f"Slice(s) {', '.join(map(str, outside))} marked empty are outside the scan "
            f"(0..{n_slices - 1} along {AXIS_NAMES[axis]}): mark slices of this scan."
        )
    painted = [int(i) for i in empty if np.take(labels, int(i), axis=axis).any()]
    if painted:
        raise FewLabelError(
            f"Slice(s) {', '.join(map(str, painted))} along {AXIS_NAMES[axis]} are marked "
            "empty but have painted voxels: erase the paint there, or unmark the slice(s)."
        )
    return empty


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise FewLabelError(f"Slice axis must be 0, 1 or 2 (z, y, x), got {axis}.")


def corrected_slices(before: np.ndarray, after: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` of the slices where ``after`` differs from ``before``.

    What a user changed in a prediction: each such slice becomes a labelled
    slice for the next round (the rest of it is the prediction, accepted).

    Raises
    ------
    FewLabelError
        When the changes lie in a single slice of another orientation spanning
        several ``axis`` slices: a correction drawn in a coronal view of a model
        that learns from axial slices, which would label many axial slices that
        nobody checked.
    """
    _check_axis(axis)
    if before.shape != after.shape:
        raise FewLabelError(
            f"The prediction layer has shape {after.shape} but the prediction shown had "
            f"{before.shape}: predict again, then correct."
        )
    changed = before != after
    along = np.flatnonzero(np.moveaxis(changed, axis, 0).reshape(changed.shape[axis], -1).any(1))
    if along.size > 1:
        for other in (a for a in range(3) if a != axis):
            hit = np.flatnonzero(
                np.moveaxis(changed, other, 0).reshape(changed.shape[other], -1).any(1)
            )
            if hit.size == 1:
                raise FewLabelError(
                    f"The corrections lie in {AXIS_NAMES[other]} slice {int(hit[0])}, across "
                    f"{along.size} {AXIS_NAMES[axis]} slices, but the model learns from "
                    f"{AXIS_NAMES[axis]} slices: undo them (Ctrl+Z) and correct whole "
                    f"{AXIS_NAMES[axis]} slices instead."
                )
    return along
