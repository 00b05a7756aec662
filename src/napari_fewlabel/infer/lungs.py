"""Lung segmentation for chest CT in Hounsfield units: right lung, left lung, airway.

A classical, training-free pipeline (in the spirit of Hu, Hoffman & Reinhardt,
IEEE TMI 2001), spacing-aware and a few seconds per scan on a CPU:

1. **Air inside the body.** Voxels below ``air_threshold_hu`` (-320 HU) are
   air or lung. Air connected, within its axial slice, to the border of the
   slice is outside the patient; the largest remaining 3D region is the body
   (this drops the table, blankets and the air in and around them).
2. **Airway.** A seed is the trachea in the highest slices that show it: a
   pure-air (< -950 HU) region of trachea size near the left-right middle of
   the body, not part of a lung, that goes on as a tube for 10 mm down. From
   it the airway lumen is grown slice by slice, up and down, into the
   pure-air regions within reach of the previous slice's airway; a region
   larger than four trachea cross-sections is lung leaking in (emphysema
   next to a bronchus) and is not taken. The lumen plus its partial-volume
   rim is removed from the air, which disconnects the two lungs at the
   carina.
3. **Right and left.** The large air regions that remain are the lungs (bowel
   gas is dropped: small, or pure air without vessels and less than half the
   size of the largest region). Two regions on
   either side of the body's middle are the two lungs. One region spanning
   both sides means the lungs touch (thin anterior or posterior junction
   line): it is split where it is thinnest, by raising an in-plane distance
   threshold until it falls apart, and every voxel goes to the nearest part.
4. **Morphology.** Each lung is closed with a spacing-aware ellipsoid
   (``closing_radius_mm``) and its holes are filled slice by slice, so that
   vessels, airway walls and nodules surrounded by lung count as lung, as
   emphysema scores expect.

Labels follow the patient, not the screen: :data:`RIGHT_LUNG` is the patient's
right lung, which in the display orientation of :class:`~napari_fewlabel.io.Volume`
(axis 2 points toward the patient's Left) has the *smaller* x indices.

Limits
------
* No fissures, lobes or segments: two labels only.
* Dense disease is not lung air: consolidation, atelectasis, large masses
  touching the chest wall, fibrosis and pleural effusion (all above -320 HU)
  are left out where they touch the lung border; only what lung surrounds in
  an axial slice (or the closing bridges) is filled in.
* Hole filling is per axial slice: a diaphragm dome that lung rings
  completely in a slice would count as lung (the heart usually closes the
  ring medially, so this is rare).
* A lung smaller than a tenth of the other (collapse, resection) is not found.
* Intrapulmonary bronchi stay in the lungs (as in standard emphysema scoring);
  only the trachea and the main bronchi outside the lungs are removed.
* Very severe emphysema (more than half a lung below -960 HU) in a lung less
  than half the size of the other looks like bowel gas and is dropped;
  emphysema next to the main bronchi stops the airway early.
* Needs a chest CT in Hounsfield units that shows the whole chest
  cross-section; not for MR, not for CT stored without its rescale slope and
  intercept, not for non-chest CT (these raise :class:`FewLabelError`). Scans
  whose field of view cuts through the lungs lose the air at the cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume

#: label values in :attr:`LungMasks.labels`.
RIGHT_LUNG = 1
LEFT_LUNG = 2
#: Names and colours of :attr:`LungMasks.labels` (saved with the mask, shown in napari).
LUNG_CLASSES = (
    SegmentationClass(0, "background", (0, 0, 0)),
    SegmentationClass(RIGHT_LUNG, "right lung", (51, 153, 255)),
    SegmentationClass(LEFT_LUNG, "left lung", (255, 153, 51)),
)

#: Pure air: the lumen of the airway (and the gas in the bowel).
PURE_AIR_HU = -950.0

# Trachea cross-section in adults is about 1.5-5 cm^2 (13-25 mm wide); the
# bounds are loose so children and collapsed tracheas still count.
_TRACHEA_AREA_MM2 = (30.0, 900.0)
# An airway region larger than this many trachea cross-sections is lung leaking in
# (the carina in a thick slice can look twice as wide as the trachea).
_LEAK_FACTOR = 4.0
# Smallest air region taken for a lung, as a share of the largest one and in mL.
_MIN_LUNG_SHARE = 0.1
_MIN_LUNG_ML = 100.0
# A region whose median is pure air has no vessels in it: gas, not lung, when it is
# also less than half the size of the largest region.
_GAS_MEDIAN_HU = -960.0
_GAS_MAX_SHARE = 0.5
# Each side of a region spanning the midline must hold this share of it to be a lung.
_MIN_SIDE_SHARE = 0.2


@dataclass(frozen=True, eq=False)
class LungMasks:
    """The lungs and the airway found in a chest CT.

    Attributes
    ----------
    labels : ndarray of uint8, shape (z, y, x)
        0 background, :data:`RIGHT_LUNG` (1) the patient's right lung,
        :data:`LEFT_LUNG` (2) the left lung. On the scan's display grid.
    airway : ndarray of bool, shape (z, y, x)
        Trachea and main bronchi outside the lungs: the lumen and its rim of
        partial-volume voxels. Empty when no trachea is in the field of view.
    spacing_mm : tuple of float
        Voxel size along ``(z, y, x)`` in mm.
    lungs_were_split : bool
        True when the two lungs touched and were separated where the
        connection is thinnest.
    """

    labels: np.ndarray
    airway: np.ndarray
    spacing_mm: tuple[float, float, float]
    lungs_were_split: bool

    @property
    def lungs(self) -> np.ndarray:
        """Both lungs as one bool mask ``(z, y, x)``."""
        return self.labels > 0

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel in mL."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def volume_ml(self, which: Literal["both", "right", "left"] = "both") -> float:
        """Lung volume in mL: both lungs, or the patient's right or left lung."""
        if which == "both":
            count = np.count_nonzero(self.labels)
        elif which in ("right", "left"):
            value = RIGHT_LUNG if which == "right" else LEFT_LUNG
            count = np.count_nonzero(self.labels == value)
        else:
            raise FewLabelError(f"Unknown lung {which!r}: use 'both', 'right' or 'left'.")
        return count * self.voxel_ml


def require_ct_in_hu(scan: Volume) -> None:
    """Raise :class:`FewLabelError` unless ``scan`` looks like CT in Hounsfield units.

    CT in HU has air at about -1000 HU around the patient and in the lungs. MR
    scans, and CT stored as raw detector values (air near 0, without the
    rescale intercept applied), fail with a sentence saying what to do.
    """
    name = scan.header.get("path", "This scan")
    if scan.modality == "MR":
        raise FewLabelError(
            f"{name} is an MR scan: lung segmentation and emphysema scores need a chest CT "
            "in Hounsfield units. Open the patient's chest CT instead."
        )
    if scan.array.dtype.kind not in "iuf":
        raise FewLabelError(
            f"{name} holds {scan.array.dtype} values: open a greyscale chest CT in "
            "Hounsfield units."
        )
    # A strided subsample (about 256k voxels) is enough to see where the air sits.
    step = max(1, int(np.ceil((scan.array.size / 262_144) ** (1 / 3))))
    sample = np.asarray(scan.array[::step, ::step, ::step], dtype=np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    air_share = np.count_nonzero((sample >= -1100) & (sample <= -900)) / max(sample.size, 1)
    if air_share < 0.02:
        lowest = float(sample.min()) if sample.size else float("nan")
        raise FewLabelError(
            f"{name} does not look like CT in Hounsfield units: {100 * air_share:.1f}% of "
            f"voxels are air (-1100 to -900 HU), lowest value {lowest:g}. Use a chest CT "
            "in HU; if it is CT stored without rescaling, apply the DICOM RescaleSlope and "
            "RescaleIntercept (usually HU = value - 1024) first."
        )


def segment_lungs(
    scan: Volume,
    *,
    air_threshold_hu: float = -320.0,
    closing_radius_mm: float = 4.0,
) -> LungMasks:
    """Find the right lung, the left lung and the airway in a chest CT.

    Parameters
    ----------
    scan : Volume
        Chest CT in Hounsfield units, ``array`` of shape ``(z, y, x)`` in the
        display orientation (axis 2 toward the patient's left).
    air_threshold_hu : float
        Voxels below this are air or aerated lung (-320 HU separates lung
        from soft tissue and fat).
    closing_radius_mm : float
        Radius of the ellipsoid that closes each lung's border (in mm, the
        same along every axis; an axis whose spacing exceeds it is not closed).

    Returns
    -------
    LungMasks
        Labels ``(z, y, x)`` uint8 (1 right, 2 left), airway mask and spacing.

    Raises
    ------
    FewLabelError
        Not CT in HU, or no lung in the field of view.
    """
    require_ct_in_hu(scan)
    hu = scan.array
    sz, sy, sx = (float(s) for s in scan.spacing_mm)
    spacing_mm = (sz, sy, sx)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0

    air = hu < air_threshold_hu
    body = _body_mask(air, spacing_mm)
    inner_air = air & body
    airway = _airway_lumen(hu, inner_air, body, spacing_mm)
    # The rim of partial-volume voxels around the lumen joins the lungs at the hilum.
    airway_zone = _dilate(airway, _ellipsoid(spacing_mm, 2.0, in_plane=True)) & inner_air

    parts, n_parts = ndi.label(inner_air & ~airway_zone)
    lungs, split = _right_and_left(parts, n_parts, hu, body, spacing_mm, voxel_ml)
    labels = _smooth_and_fill(lungs, body, airway_zone, spacing_mm, closing_radius_mm)
    # Bronchi that lung surrounds were filled back in; what stays outside the lungs
    # is the trachea and the main bronchi.
    return LungMasks(
        labels=labels,
        airway=airway_zone & (labels == 0),
        spacing_mm=spacing_mm,
        lungs_were_split=split,
    )


# --------------------------------------------------------------------------- body


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus what it encloses within each axial slice (one labelling pass)."""
    regions, _ = ndi.label(~mask, structure=_in_plane_structure())
    open_to_edge = np.zeros(int(regions.max()) + 1, dtype=bool)
    for edge in (regions[:, 0, :], regions[:, -1, :], regions[:, :, 0], regions[:, :, -1]):
        open_to_edge[np.unique(edge)] = True
    open_to_edge[0] = False
    return ~open_to_edge[regions]


def _in_plane_structure() -> np.ndarray:
    """4-connectivity within an axial slice, nothing across slices."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    return structure


def _body_mask(air: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The patient: not outside air, the largest 3D region, holes included.

    Works on a grid subsampled in-plane to about 1.2 mm: the body's outline
    only has to be right to a millimetre, and this is the costliest step.
    """
    step = max(1, round(1.2 / min(spacing_mm[1], spacing_mm[2])))
    coarse = air[:, ::step, ::step]
    inside = _fill_holes_per_slice(~coarse)
    pieces, n_pieces = ndi.label(inside)
    if n_pieces == 0:
        return np.zeros(air.shape, dtype=bool)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    body = pieces == int(sizes.argmax())
    if step > 1:
        body = np.repeat(np.repeat(body, step, axis=1), step, axis=2)
        body = body[:, : air.shape[1], : air.shape[2]]
    return np.ascontiguousarray(body)


# ------------------------------------------------------------------------ airway


def _airway_lumen(
    hu: np.ndarray, inner_air: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float]
) -> np.ndarray:
    """Trachea and bronchi lumen (< -950 HU), grown slice by slice from the trachea."""
    airway = np.zeros(hu.shape, dtype=bool)
    found = _find_trachea(hu, inner_air, body, spacing_mm)
    if found is None:
        return airway
    z0, seed, trachea_mm2 = found
    airway[z0] = seed
    pixel_mm2 = spacing_mm[1] * spacing_mm[2]
    # Below the carina every bronchus is narrower than the trachea; a region much
    # larger than the trachea is lung leaking into the lumen.
    largest_px = _LEAK_FACTOR * max(trachea_mm2, 100.0) / pixel_mm2
    reach = _disc(spacing_mm, _reach_mm(spacing_mm))
    for direction in (-1, 1):
        previous = seed
        z = z0 + direction
        while 0 <= z < hu.shape[0] and previous.any():
            regions, areas = _regions_touching(hu[z], body[z], previous, reach)
            keep = (areas <= largest_px) & (np.arange(areas.size) > 0)
            previous = keep[regions]
            airway[z] = previous
            z += direction
    return airway


def _find_trachea(
    hu: np.ndarray, inner_air: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float]
) -> tuple[int, np.ndarray, float] | None:
    """The trachea's cross-section in the highest slice that shows it, or None.

    A candidate is a pure-air region of trachea size within the middle fifth
    of the body's width, whose aerated surroundings (< -320 HU) are not much
    larger than itself (which rules out bullae in a lung apex), and that
    continues as a tube of trachea size over the next 10 mm down (which rules
    out the larynx and stray air). Returns the slice, its cross-section
    ``(y, x)`` and the largest cross-section of the tube in mm^2.
    """
    pixel_mm2 = spacing_mm[1] * spacing_mm[2]
    lo, hi = (a / pixel_mm2 for a in _TRACHEA_AREA_MM2)
    reach = _disc(spacing_mm, _reach_mm(spacing_mm))
    follow = max(2, int(np.ceil(10.0 / spacing_mm[0])))
    for z in range(hu.shape[0] - 1, follow - 1, -1):
        columns = np.nonzero(body[z].any(axis=0))[0]
        if columns.size == 0:
            continue
        middle = 0.5 * (columns[0] + columns[-1])
        half_width = 0.5 * (columns[-1] - columns[0])
        regions, n = ndi.label((hu[z] < PURE_AIR_HU) & body[z])
        if n == 0:
            continue
        areas = np.bincount(regions.ravel())
        aerated, _ = ndi.label(inner_air[z])
        aerated_areas = np.bincount(aerated.ravel())
        for r in np.argsort(areas[1:])[::-1] + 1:
            if not lo <= areas[r] <= hi:
                continue
            ys, xs = np.nonzero(regions == r)
            if abs(xs.mean() - middle) > 0.2 * half_width:
                continue
            # The aerated region around a trachea is its lumen plus a thin rim of
            # partial-volume voxels; around a bulla it is a whole lung.
            if aerated_areas[aerated[ys[0], xs[0]]] > 2.5 * areas[r] + 50.0 / pixel_mm2:
                continue
            seed = regions == r
            largest = float(areas[r])
            tube = seed
            for k in range(1, follow + 1):
                below, below_areas = _regions_touching(hu[z - k], body[z - k], tube, reach)
                fits = (below_areas >= lo) & (below_areas <= hi) & (np.arange(below_areas.size) > 0)
                if not fits.any():
                    break
                tube = fits[below]
                largest = max(largest, float(below_areas[fits].max()))
            else:
                return z, seed, largest * pixel_mm2
    return None


def _regions_touching(
    hu_slice: np.ndarray, body_slice: np.ndarray, previous: np.ndarray, reach: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pure-air regions of one slice within ``reach`` of ``previous``.

    Returns the region map ``(y, x)`` (0 where there is none) and the area of
    each region in pixels, indexed by region number (index 0 is unused).
    """
    regions, n = ndi.label((hu_slice < PURE_AIR_HU) & body_slice)
    near = _dilate(previous, reach)
    touched = np.zeros(n + 1, dtype=bool)
    touched[np.unique(regions[near])] = True
    touched[0] = False
    regions = np.where(touched[regions], regions, 0)
    return regions, np.bincount(regions.ravel(), minlength=n + 1) * touched


def _reach_mm(spacing_mm: tuple[float, float, float]) -> float:
    """How far an airway's cross-section may move between slices: half a slice, >= 2 mm."""
    return max(2.0, 0.5 * spacing_mm[0])


def _disc(spacing_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """A disc of ``radius_mm`` on the ``(y, x)`` pixel grid."""
    return _ellipsoid(spacing_mm, radius_mm, in_plane=True)[0]


def _dilate(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary dilation computed only around ``mask``'s bounding box (same result, faster)."""
    out = np.zeros(mask.shape, dtype=bool)
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return out
    half = [k // 2 for k in structure.shape]
    box = tuple(
        slice(max(0, s.start - h), min(n, s.stop + h))
        for s, h, n in zip(found[0], half, mask.shape, strict=True)
    )
    out[box] = ndi.binary_dilation(mask[box], structure=structure)
    return out


def _ellipsoid(
    spacing_mm: tuple[float, float, float], radius_mm: float, *, in_plane: bool = False
) -> np.ndarray:
    """A ball of ``radius_mm`` on the voxel grid, shape (2a+1, 2b+1, 2c+1).

    Never smaller than the in-plane neighbours of a voxel, so that a small
    radius on a coarse grid still does something; flat (one slice) with
    ``in_plane`` or when the slices are thicker than the radius.
    """
    radius = max(radius_mm, spacing_mm[1], spacing_mm[2])
    half = [0 if in_plane else int(radius // spacing_mm[0])]
    half += [int(radius // s) for s in spacing_mm[1:]]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, spacing_mm, strict=True))
    return np.asarray(dist2 <= radius**2 + 1e-9)


# ----------------------------------------------------------------- right and left


def _right_and_left(
    parts: np.ndarray,
    n_parts: int,
    hu: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float, float],
    voxel_ml: float,
) -> tuple[np.ndarray, bool]:
    """Label the lung regions 1 (right) / 2 (left); True when they had to be split."""
    sizes = np.bincount(parts.ravel(), minlength=n_parts + 1)
    sizes[0] = 0
    largest = int(sizes.max(initial=0))
    if largest * voxel_ml < _MIN_LUNG_ML:
        raise FewLabelError(
            "No lung found in this CT (the largest air region inside the body is "
            f"{largest * voxel_ml:.0f} mL): lung segmentation needs a chest CT that "
            "shows the lungs."
        )
    keep_ml = max(_MIN_LUNG_ML, _MIN_LUNG_SHARE * largest * voxel_ml)
    candidates = [int(i) for i in np.nonzero(sizes * voxel_ml >= keep_ml)[0]]
    boxes = ndi.find_objects(parts)

    def looks_like_gas(i: int) -> bool:
        # Bowel gas is pure air without vessels and far smaller than a lung; an
        # emphysematous lung as large as the other one is kept whatever its density.
        values = hu[boxes[i - 1]][parts[boxes[i - 1]] == i]
        return sizes[i] < _GAS_MAX_SHARE * largest and np.median(values) < _GAS_MEDIAN_HU

    lung_ids = [i for i in candidates if not looks_like_gas(i)]
    columns = np.nonzero(body.any(axis=(0, 1)))[0]
    midline_x = 0.5 * (columns[0] + columns[-1])
    lung_ids.sort(key=lambda i: -sizes[i])
    labels = np.zeros(parts.shape, dtype=np.uint8)
    split = False
    first = parts == lung_ids[0]
    left_share = np.count_nonzero(first[..., int(midline_x) + 1 :]) / sizes[lung_ids[0]]
    if min(left_share, 1.0 - left_share) >= _MIN_SIDE_SHARE:
        # One region on both sides of the middle: the lungs touch.
        labels = _split_touching_lungs(first, spacing_mm)
        split = True
        others = lung_ids[1:]
    else:
        others = lung_ids
    for i in others:
        box = boxes[i - 1]
        region = parts[box] == i
        centre_x = np.nonzero(region)[2].mean() + (box[2].start or 0)
        labels[box][region] = RIGHT_LUNG if centre_x < midline_x else LEFT_LUNG
    return labels, split


def _split_touching_lungs(merged: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Cut one region holding both lungs where it is thinnest; 1 right, 2 left.

    The in-plane distance to the region's border is raised until the core
    falls into two large pieces (the junction line goes first: it is a few
    mm thick, the lungs centimetres); each voxel then joins the nearest piece.
    """
    box = ndi.find_objects(merged.astype(np.uint8))[0]
    crop = np.pad(merged[box], ((0, 0), (1, 1), (1, 1)))
    # A huge z step keeps every distance within its own slice.
    sampling = (1e6, spacing_mm[1], spacing_mm[2])
    depth = ndi.distance_transform_edt(crop, sampling=sampling)
    total = np.count_nonzero(crop)
    seeds = None
    for radius_mm in np.arange(1.0, 40.0, 1.0):
        pieces, n = ndi.label(depth > radius_mm)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] >= 0.5 * _MIN_SIDE_SHARE * total:
            seeds = np.where(pieces == first, 1, 0) + np.where(pieces == second, 2, 0)
            break
    if seeds is None:
        raise FewLabelError(
            "The two lungs could not be told apart (they stay joined however thin the "
            "cut): this may not be a chest CT, or the lungs are fused by disease."
        )
    _, nearest = ndi.distance_transform_edt(seeds == 0, sampling=sampling, return_indices=True)
    owner = seeds[tuple(nearest)] * crop
    xs = [np.nonzero(owner == k)[2].mean() for k in (1, 2)]
    right_piece = 1 if xs[0] < xs[1] else 2
    relabelled = np.where(owner == right_piece, RIGHT_LUNG, np.where(owner > 0, LEFT_LUNG, 0))
    labels = np.zeros(merged.shape, dtype=np.uint8)
    labels[box] = relabelled[:, 1:-1, 1:-1]
    return labels


# --------------------------------------------------------------------- morphology


def _smooth_and_fill(
    lungs: np.ndarray,
    body: np.ndarray,
    airway: np.ndarray,
    spacing_mm: tuple[float, float, float],
    closing_radius_mm: float,
) -> np.ndarray:
    """Close each lung, fill its holes per axial slice, keep it inside the body.

    The closing may not reach into the airway (it would bridge the lung to a
    main bronchus); the hole filling may, so that bronchi inside the lung
    count as lung.
    """
    ball = _ellipsoid(spacing_mm, closing_radius_mm)
    margin = np.array(ball.shape) // 2 + 1
    out = np.zeros(lungs.shape, dtype=np.uint8)
    for value in (RIGHT_LUNG, LEFT_LUNG):
        mask = lungs == value
        boxes = ndi.find_objects(mask.astype(np.uint8))
        if not boxes or boxes[0] is None:
            continue
        box = tuple(
            slice(max(0, s.start - m), min(n, s.stop + m))
            for s, m, n in zip(boxes[0], margin, lungs.shape, strict=True)
        )
        # Pad so the closing does not erode against the crop's edge.
        crop = np.pad(mask[box], [(m, m) for m in margin])
        closed = ndi.binary_closing(crop, structure=ball)
        closed = closed[tuple(slice(m, -m) for m in margin)] & ~airway[box]
        filled = _fill_holes_per_slice(closed | mask[box])
        grown = filled & body[box] & ((out[box] == 0) | mask[box])
        out[box][grown] = value
    return out
