"""Per-class segmentation metrics in physical units: Dice, HD95 and ASD (mm).

Definitions follow MONAI's metrics (``compute_dice``,
``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)``) and are checked against
them in the tests; this module needs only scipy, so it is usable without MONAI.

* Surface of a mask: its voxels with a 6-connected neighbour outside it.
* Directed distances: from every surface voxel of A to the nearest surface
  voxel of B, in mm with the voxel spacing (Euclidean distance transform).
* HD95 = max of the two directed 95th percentiles; ASD = mean of all
  directed distances of both directions together.

Empty masks: Dice is 1 when both are empty (nothing to find, nothing found)
and 0 when only one is; the distances are undefined then (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_fewlabel.errors import FewLabelError


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class.

    Attributes
    ----------
    index : int
    name : str
    dice : float
    hd95_mm, asd_mm : float
        NaN when either mask is empty.
    voxels_pred, voxels_truth : int
    """

    index: int
    name: str
    dice: float
    hd95_mm: float
    asd_mm: float
    voxels_pred: int
    voxels_truth: int


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    denom = int(pred.sum()) + int(truth.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): pred surface -> truth surface, and back.

    Both masks must be non-empty. The work is done inside the bounding box of
    the two masks (plus one voxel), so large volumes with small structures are cheap.
    """
    both = pred | truth
    box = tuple(slice(max(0, int(idx.min()) - 1), int(idx.max()) + 2) for idx in np.nonzero(both))
    p, t = pred[box], truth[box]
    sp, st = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing_mm)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing_mm)
    return dist_to_t[sp], dist_to_p[st]


def class_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    class_names: Sequence[str] | None = None,
) -> list[ClassMetrics]:
    """Dice, HD95 and ASD for every foreground class of ``truth`` and ``pred``.

    Parameters
    ----------
    pred, truth : ndarray, shape (z, y, x)
        Integer label maps of the same shape.
    spacing_mm : sequence of float
        Voxel size ``(z, y, x)`` in mm.
    class_names : sequence of str, optional
        Names by label value (index 0 = background); default ``"class i"``.
        With names, every named foreground class is reported, present or not.

    Returns
    -------
    list of ClassMetrics
        One per foreground class, by label value.
    """
    if pred.shape != truth.shape:
        raise FewLabelError(
            f"Prediction shape {pred.shape} differs from the ground truth's {truth.shape}: "
            "compare masks of the same scan."
        )
    if len(spacing_mm) != pred.ndim:
        raise FewLabelError(f"Give one spacing per axis, got {spacing_mm} for {pred.ndim} axes.")
    present = set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())
    if class_names is not None:
        present |= set(range(len(class_names)))
    results = []
    for k in sorted(present - {0}):
        p, t = pred == k, truth == k
        name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
        hd95 = asd = float("nan")
        if p.any() and t.any():
            d_pt, d_tp = surface_distances(p, t, spacing_mm)
            hd95 = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
            asd = float(np.concatenate([d_pt, d_tp]).mean())
        results.append(
            ClassMetrics(
                index=int(k),
                name=name,
                dice=dice_score(p, t),
                hd95_mm=hd95,
                asd_mm=asd,
                voxels_pred=int(p.sum()),
                voxels_truth=int(t.sum()),
            )
        )
    return results
