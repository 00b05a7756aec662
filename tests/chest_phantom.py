"""A small synthetic chest CT in HU with lungs whose emphysema share is known exactly.

Geometry (display orientation: z up, y toward posterior, x toward the patient's
left): a soft-tissue body (40 HU) in air (-1000 HU) on a hollow table, two
ellipsoidal lungs of parenchyma (-900..-800 HU), and optionally a trachea that
branches into both lungs, so the lungs are joined through the airway, or lungs
that touch at the midline. In each lung and each third of the lung height an
exact number of voxels is set to emphysema (-1000..-960 HU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_fewlabel.io import Volume

# Emphysema share per (lung, third): right / left x lower / middle / upper.
# Upper-zone predominant, as in centrilobular emphysema.
EMPHYSEMA_SHARE = {"right": (0.01, 0.04, 0.10), "left": (0.02, 0.06, 0.16)}


@dataclass(frozen=True, eq=False)
class SyntheticChest:
    scan: Volume
    right_lung: np.ndarray  # bool (z, y, x): the patient's right lung (small x)
    left_lung: np.ndarray
    emphysema: np.ndarray  # bool (z, y, x): the voxels set below -950 HU
    trachea: np.ndarray  # bool (z, y, x): airway lumen outside the lungs (empty without airway)


def synthetic_chest(
    *,
    spacing_mm: tuple[float, float, float] = (2.5, 1.5, 1.5),
    with_airway: bool = False,
    touching: bool = False,
    seed: int = 0,
) -> SyntheticChest:
    """Build the phantom on a grid of ``spacing_mm`` (z, y, x) covering 200 x 240 x 300 mm."""
    rng = np.random.default_rng(seed)
    shape = tuple(round(extent / s) for extent, s in zip((200, 240, 300), spacing_mm, strict=True))
    z, y, x = (
        (np.arange(n) + 0.5) * s for n, s in zip(shape, spacing_mm, strict=True)
    )  # voxel centres in mm
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij", sparse=True)

    hu = np.full(shape, -1000.0)
    body = ((xx - 150) / 130) ** 2 + ((yy - 115) / 95) ** 2 <= 1.0
    hu[np.broadcast_to(body, shape)] = 40.0
    table = (yy >= 222) & (yy <= 232) & (np.abs(xx - 150) <= 140)
    table_air = (yy >= 225) & (yy <= 229) & (np.abs(xx - 150) <= 120)
    hu[np.broadcast_to(table & ~table_air, shape)] = 200.0

    half_gap = 45.0 if touching else 60.0
    semi_x = 45.5 if touching else 45.0

    def ellipsoid(cx: float) -> np.ndarray:
        return ((xx - cx) / semi_x) ** 2 + ((yy - 115) / 65) ** 2 + ((zz - 90) / 80) ** 2 <= 1.0

    right_lung = ellipsoid(150 - half_gap)
    left_lung = ellipsoid(150 + half_gap) & ~right_lung
    lungs = right_lung | left_lung
    hu[lungs] = rng.uniform(-900, -800, size=int(lungs.sum()))

    trachea = np.zeros(shape, dtype=bool)
    if with_airway:
        lumen, wall = _airway(zz, yy, xx, half_gap)
        hu[wall & ~lumen] = 40.0
        hu[lumen] = -1000.0
        trachea = lumen & ~lungs
        right_lung &= ~lumen
        left_lung &= ~lumen

    emphysema = np.zeros(shape, dtype=bool)
    lung_slices = np.nonzero((right_lung | left_lung).any(axis=(1, 2)))[0]
    lowest, n = lung_slices[0], lung_slices[-1] - lung_slices[0] + 1
    third = np.full(shape[0], -1)
    third[lowest : lowest + n] = (3 * np.arange(n)) // n
    for name, lung in (("right", right_lung), ("left", left_lung)):
        for t, share in enumerate(EMPHYSEMA_SHARE[name]):
            where = np.flatnonzero(lung & (third[:, None, None] == t))
            chosen = rng.choice(where, size=round(share * where.size), replace=False)
            emphysema.flat[chosen] = True
    hu[emphysema] = rng.uniform(-1000, -960, size=int(emphysema.sum()))

    scan = Volume.from_array(np.round(hu).astype(np.int16), spacing_mm, modality="CT")
    return SyntheticChest(scan, right_lung, left_lung, emphysema, trachea)


def _airway(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, half_gap: float):
    """Lumen (radius 7 mm) and wall (+2 mm) of a trachea branching into both lungs."""
    radius, wall = 7.0, 9.0
    # Trachea: vertical, midline, anterior to the lungs' centre, from the top to z = 150 mm.
    d_trachea = np.hypot(xx - 150, yy - 100)
    d_trachea = np.where(zz >= 150, d_trachea, np.hypot(d_trachea, zz - 150))
    distances = [d_trachea]
    for side in (-1, 1):
        # Main bronchus, (z, y, x) in mm: from the carina 45 degrees down into the lung.
        start = np.array([150.0, 100.0, 150.0])
        end = np.array([100.0, 105.0, 150.0 + side * 50.0])
        distances.append(_segment_distance(zz, yy, xx, start, end))
    nearest = np.minimum.reduce(distances)
    return nearest <= radius, nearest <= wall


def _segment_distance(zz, yy, xx, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance in mm from every voxel centre to the segment ``start``-``end`` (z, y, x)."""
    axis = end - start
    t = ((zz - start[0]) * axis[0] + (yy - start[1]) * axis[1] + (xx - start[2]) * axis[2]) / (
        axis @ axis
    )
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(
        (zz - start[0] - t * axis[0]) ** 2
        + (yy - start[1] - t * axis[1]) ** 2
        + (xx - start[2] - t * axis[2]) ** 2
    )
