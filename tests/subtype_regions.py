"""Subtype regions as an annotator would paint them on the synthetic emphysema phantom."""

from __future__ import annotations

import numpy as np

SUBTYPES = (1, 2, 3, 4)


def labelled_blobs(
    truth: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    per_class: int = 12,
    radius_mm: float = 5.0,
    seed: int = 1,
) -> np.ndarray:
    """A few small balls of each subtype, cut from the truth, as an annotator would paint them.

    Centres are spread over each class's region (k-means centres of its voxels, at least
    two voxels from its border); each ball keeps only voxels of its class.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm)
    painted = np.zeros_like(truth)
    grid = np.ogrid[tuple(slice(0, n) for n in truth.shape)]
    for c in SUBTYPES:
        voxels = np.argwhere(ndi.binary_erosion(truth == c, iterations=2))
        points = voxels * spacing
        centres = points[rng.choice(len(points), per_class, replace=False)]
        for _ in range(20):
            nearest = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
            centres = np.array(
                [
                    points[nearest == k].mean(0) if np.any(nearest == k) else centres[k]
                    for k in range(per_class)
                ]
            )
        seeds = voxels[np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=0)]
        for centre in seeds:
            ball = sum(((g - v) * s) ** 2 for g, v, s in zip(grid, centre, spacing, strict=True))
            painted[(ball <= radius_mm**2) & (truth == c)] = c
    return painted
