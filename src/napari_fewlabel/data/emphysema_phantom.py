"""A synthetic chest CT with emphysema subtypes whose extent is known voxel by voxel.

No public data set with emphysema subtype labels installs through a package
registry, so subtype mapping is developed and tested on this deterministic
phantom (it is synthetic: figures measured on it say that the method works
as built, not how well it works on patients).

Anatomy (display orientation: z up, y toward posterior, x toward the
patient's left): a soft-tissue body (about 40 HU) in air, two lungs
(ellipsoids with a bumpy surface) of parenchyma around -860 HU with a
fine texture and a branching-looking vessel tree (tubes where two smooth
random fields are both near zero; thinner toward the pleura).

Subtypes (Fleischner Society; label values of :data:`SUBTYPE_CLASSES`)

1 normal
    parenchyma and vessels only.
2 centrilobular
    small round lucencies (radius 2-4 mm, about -990 HU) scattered in normal
    parenchyma, in parts of the *upper* zone away from the pleura.
3 paraseptal
    larger subpleural lucencies (radius 4-6 mm) in a row along the lung
    edge, walled by thin septa (-750 HU), in a band 15 mm deep on part of
    the lung surface (the side varies with the seed) above the lower zone.
4 panlobular
    diffuse low attenuation (parenchyma around -935 HU, sparse thin vessels,
    no focal lucency) in parts of the *lower* zone.

The classes differ in shape and place, not only in mean density: a voxel's
HU says little (normal parenchyma and a lucency's rim overlap every class),
and the centrilobular and paraseptal zones have about the same mean density.
Which parts of each zone are affected is drawn from smooth random fields, so
location alone does not decide the class either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES, SegmentationClass
from napari_fewlabel.io.volume import Volume

NORMAL, CENTRILOBULAR, PARASEPTAL, PANLOBULAR = 1, 2, 3, 4

#: Label values and colours of emphysema subtype maps (0 = not lung).
SUBTYPE_CLASSES = EMPHYSEMA_SUBTYPES

#: Depth of the subpleural band where paraseptal lucencies lie, in mm.
PARASEPTAL_BAND_MM = 15.0


@dataclass(frozen=True, eq=False)
class EmphysemaPhantom:
    """The phantom scan and its truth.

    Attributes
    ----------
    scan : Volume
        CT in HU (int16), ``(z, y, x)``, modality CT.
    labels : Volume
        Subtype of every lung voxel (uint8, values of :data:`SUBTYPE_CLASSES`;
        0 outside the lungs), on the scan's grid.
    classes : tuple of SegmentationClass
    """

    scan: Volume
    labels: Volume
    classes: tuple[SegmentationClass, ...] = SUBTYPE_CLASSES


def emphysema_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (72, 104, 144),
    spacing_mm: tuple[float, float, float] = (2.5, 2.0, 2.0),
) -> EmphysemaPhantom:
    """Build the phantom (deterministic for a seed); see the module docstring.

    Parameters
    ----------
    seed : int
        Changes the texture, the lucencies and which parts of each zone are affected.
    shape : tuple of int
        ``(z, y, x)`` voxels; the anatomy scales with the field of view
        ``shape * spacing_mm`` (lungs about 60% of its width).
    spacing_mm : tuple of float
        Voxel size ``(z, y, x)``.
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    extent = np.asarray(shape) * spacing
    z, y, x = ((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    cz, cy, cx = extent / 2

    def smooth_noise(sigma_mm: float) -> np.ndarray:
        field = ndi.gaussian_filter(rng.standard_normal(shape), sigma_mm / spacing, mode="wrap")
        return (field / (field.std() + 1e-12)).astype(np.float32)

    # Body: an elliptic cylinder of soft tissue.
    body = ((xx - cx) / (0.46 * extent[2])) ** 2 + ((yy - cy) / (0.44 * extent[1])) ** 2 <= 1
    body = np.broadcast_to(body, shape)
    hu = np.where(body, 40.0, -1000.0) + 12 * rng.standard_normal(shape)

    # Lungs: ellipsoids with a bumpy surface, one each side of the mediastinum.
    semi = np.array([0.40 * extent[0], 0.31 * extent[1], 0.18 * extent[2]])
    bumps = 0.06 * smooth_noise(12.0)
    lungs = []
    for side in (-1, 1):
        centre_x = cx + side * 0.215 * extent[2]
        r = (
            ((zz - cz) / semi[0]) ** 2
            + ((yy - cy) / semi[1]) ** 2
            + ((xx - centre_x) / semi[2]) ** 2
        )
        lungs.append((r <= 1 + bumps) & body)
    lung = lungs[0] | lungs[1]

    depth_mm = ndi.distance_transform_edt(lung, sampling=spacing)
    lung_z = np.nonzero(lung.any(axis=(1, 2)))[0]
    height = np.zeros(shape[0])
    height[lung_z[0] : lung_z[-1] + 1] = np.linspace(0, 1, lung_z[-1] - lung_z[0] + 1)
    height_field = np.broadcast_to(height[:, None, None], shape)

    # Zone borders: heights that wave across the lung (smooth random surfaces), so place
    # alone does not decide the class.
    upper_border = 0.58 + 0.06 * smooth_noise(25.0)[shape[0] // 2][None]
    lower_border = 0.3 + 0.06 * smooth_noise(25.0)[shape[0] // 2][None]
    theta0 = rng.uniform(-np.pi, np.pi)
    subtype = np.zeros(shape, dtype=np.uint8)
    subtype[lung] = NORMAL
    for side, one_lung in zip((-1, 1), lungs, strict=True):
        centre_x = cx + side * 0.215 * extent[2]
        angle = np.arctan2(yy - cy, (xx - centre_x) * side)
        sector = np.broadcast_to(np.cos(angle - theta0) > -0.2, shape)
        panlobular = one_lung & (height_field < lower_border)
        paraseptal = (
            one_lung
            & ~panlobular
            & (depth_mm < PARASEPTAL_BAND_MM)
            & (height_field >= lower_border)
            & sector
        )
        centrilobular = one_lung & (height_field > upper_border) & (depth_mm >= PARASEPTAL_BAND_MM)
        subtype[panlobular] = PANLOBULAR
        subtype[paraseptal] = PARASEPTAL
        subtype[centrilobular] = CENTRILOBULAR

    # Parenchyma and vessels.
    parenchyma = -860 + 25 * smooth_noise(2.0) + 15 * rng.standard_normal(shape)
    parenchyma[subtype == PANLOBULAR] -= 75
    a, b = smooth_noise(7.0), smooth_noise(7.0)
    vessel_radius = np.where(subtype == PANLOBULAR, 0.05, 0.11) * np.clip(depth_mm / 15, 0.3, 1)
    vessels = ndi.gaussian_filter(
        ((np.abs(a) < vessel_radius) & (np.abs(b) < vessel_radius)).astype(np.float32), 0.6
    )
    parenchyma = parenchyma + vessels * (40 - parenchyma)

    # Lucencies: centrilobular (small, scattered) and paraseptal (larger, subpleural, walled).
    lucent = np.zeros(shape, dtype=np.float32)
    walls = np.zeros(shape, dtype=bool)
    voxel_volume = float(np.prod(spacing))
    for label, radius_mm, spacing_lucency, depth_range in (
        (CENTRILOBULAR, (2.0, 4.0), 7.5, None),
        (PARASEPTAL, (4.0, 6.0), 6.0, (3.0, 10.0)),
    ):
        where = subtype == label
        if depth_range is not None:
            where &= (depth_mm >= depth_range[0]) & (depth_mm <= depth_range[1])
        candidates = np.flatnonzero(where)
        if candidates.size == 0:
            continue
        count = round(candidates.size * voxel_volume / spacing_lucency**3)
        centres = rng.choice(candidates, size=count, replace=False)
        for flat in centres:
            centre = np.array(np.unravel_index(flat, shape)) * spacing + spacing / 2
            radius = rng.uniform(*radius_mm)
            _add_ball(lucent, walls if label == PARASEPTAL else None, centre, radius, spacing)
    lung_hu = parenchyma * (1 - lucent) + (-990 + 8 * rng.standard_normal(shape)) * lucent
    lung_hu[walls & (lucent < 0.5)] = -750 + 20 * rng.standard_normal(
        int((walls & (lucent < 0.5)).sum())
    )
    hu[lung] = lung_hu[lung]

    scan = Volume.from_array(
        np.round(np.clip(hu, -1024, 3000)).astype(np.int16), tuple(spacing), modality="CT"
    )
    return EmphysemaPhantom(scan=scan, labels=scan.with_array(subtype, modality="CT"))


def _add_ball(
    lucent: np.ndarray,
    walls: np.ndarray | None,
    centre_mm: np.ndarray,
    radius_mm: float,
    spacing: np.ndarray,
) -> None:
    """Paint a soft-edged ball of lucency (and its one-voxel wall) into the arrays, in place."""
    reach = radius_mm + 2 * spacing.max()
    lo = np.maximum(np.floor((centre_mm - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((centre_mm + reach) / spacing).astype(int), lucent.shape)
    axes = [(np.arange(lo[i], hi[i]) + 0.5) * spacing[i] - centre_mm[i] for i in range(3)]
    dz, dy, dx = np.meshgrid(*axes, indexing="ij", sparse=True)
    distance = np.sqrt(dz**2 + dy**2 + dx**2)
    region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    soft = np.clip(radius_mm - distance + 0.5, 0, 1).astype(np.float32)
    lucent[region] = np.maximum(lucent[region], soft)
    if walls is not None:
        walls[region] |= (distance > radius_mm) & (distance <= radius_mm + spacing.min())
