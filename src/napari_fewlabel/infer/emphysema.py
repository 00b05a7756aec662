"""Emphysema scores from a chest CT: %LAA-950, %LAA-910 and Perc15, whole lung and by region.

Definitions (the ones radiology papers and the COPDGene/Fleischner reports use)
------------------------------------------------------------------------------
%LAA-950
    Low-attenuation area: the share of lung voxels *below* -950 HU, in percent
    (a voxel at exactly -950 HU does not count). The threshold is a parameter;
    -950 HU is the standard for inspiratory CT.
%LAA-910
    The same share below -910 HU, sometimes used for thick or smooth-kernel
    reconstructions, where -950 under-counts.
Perc15
    The 15th percentile of lung density: the HU value below which 15% of the
    lung voxels lie (numpy's linear interpolation between voxels). Lower means
    more emphysema.
Regions
    Both lungs; the right and the left lung (the patient's sides); and upper,
    middle and lower thirds *by height*: the axial slices from the lowest to the
    highest slice that holds lung (both lungs together) are cut into three runs
    of equal height, slice ``z`` going to third ``floor(3 * (z - lowest) / n)``
    (0 lower, 1 middle, 2 upper) where ``n`` is the number of slices in that
    range. Thirds are not lobes.
Lung volumes
    Voxel count times the voxel volume from the scan's spacing, in mL.

Scores depend on the scan: slice thickness, reconstruction kernel, dose,
inspiration and scanner calibration all shift them; compare scores from scans
taken the same way. Limits of the lung mask: see :mod:`napari_fewlabel.infer.lungs`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import (
    LEFT_LUNG,
    RIGHT_LUNG,
    LungMasks,
    require_ct_in_hu,
    segment_lungs,
)
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.io.volume import Volume

#: The standard low-attenuation threshold for inspiratory CT, in HU.
LAA_THRESHOLD_HU = -950.0
#: The second threshold reported, in HU.
LAA_910_HU = -910.0
#: The density percentile reported (Perc15).
DENSITY_PERCENTILE = 15.0

#: Region names, in the order of the report.
REGIONS = ("both lungs", "right lung", "left lung", "upper third", "middle third", "lower third")


def low_attenuation_classes(threshold_hu: float) -> tuple[SegmentationClass, ...]:
    """Names and colours of :attr:`EmphysemaReport.low_attenuation` (1 = below the threshold)."""
    return (
        SegmentationClass(0, "background", (0, 0, 0)),
        SegmentationClass(
            1, f"LAA{threshold_hu:g} (lung below {threshold_hu:g} HU)", (255, 25, 25)
        ),
    )


@dataclass(frozen=True)
class RegionScores:
    """Emphysema scores of one lung region.

    Attributes
    ----------
    region : str
        One of :data:`REGIONS`.
    volume_ml : float
        Lung volume of the region in mL.
    voxels : int
        Number of lung voxels in the region.
    laa_percent : float or None
        Share of the region's voxels below the report's threshold, in percent;
        None for a region without lung voxels.
    laa_910_percent : float or None
        Share below -910 HU, in percent.
    perc15_hu : float or None
        15th percentile of the region's voxel values, in HU.
    """

    region: str
    volume_ml: float
    voxels: int
    laa_percent: float | None
    laa_910_percent: float | None
    perc15_hu: float | None


@dataclass(frozen=True, eq=False)
class EmphysemaReport:
    """Lung masks, the low-attenuation mask and the scores of every region.

    Attributes
    ----------
    threshold_hu : float
        The low-attenuation threshold (voxels strictly below it count).
    regions : tuple of RegionScores
        One entry per name in :data:`REGIONS`, in that order.
    lungs : LungMasks
        The lung labels ``(z, y, x)`` the scores were computed on.
    low_attenuation : ndarray of bool, shape (z, y, x)
        Lung voxels below ``threshold_hu``.
    thirds_slices : tuple of (int, int)
        First and last axial slice index of the lower, middle and upper third.
    """

    threshold_hu: float
    regions: tuple[RegionScores, ...]
    lungs: LungMasks
    low_attenuation: np.ndarray
    thirds_slices: tuple[tuple[int, int], ...]

    def region(self, name: str) -> RegionScores:
        """The scores of one region by name (see :data:`REGIONS`)."""
        for scores in self.regions:
            if scores.region == name:
                return scores
        raise FewLabelError(f"Unknown region {name!r}: use one of {', '.join(REGIONS)}.")

    @property
    def laa_percent(self) -> float | None:
        """%LAA of both lungs at :attr:`threshold_hu`."""
        return self.region("both lungs").laa_percent

    def region_mask(self, name: str) -> np.ndarray:
        """The lung voxels ``(z, y, x)`` of one region (see :data:`REGIONS`)."""
        return _region_masks(self.lungs.labels, self.thirds_slices)[self.region(name).region]

    def to_table(self) -> list[dict[str, str | float | int | None]]:
        """One row per region, ready for :class:`csv.DictWriter`."""
        return [
            {
                "region": s.region,
                "lung_volume_ml": _round(s.volume_ml, 1),
                "voxels": s.voxels,
                "threshold_hu": self.threshold_hu,
                "laa_percent": _round(s.laa_percent, 3),
                "laa_910_percent": _round(s.laa_910_percent, 3),
                "perc15_hu": _round(s.perc15_hu, 1),
            }
            for s in self.regions
        ]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (no masks): threshold, spacing, thirds, regions."""
        first, last = self.thirds_slices[0][0], self.thirds_slices[-1][1]
        return {
            "threshold_hu": self.threshold_hu,
            "laa_percent": _round(self.laa_percent, 3),
            "spacing_mm_zyx": list(self.lungs.spacing_mm),
            "lungs_were_split": self.lungs.lungs_were_split,
            "airway_found": bool(self.lungs.airway.any()),
            "thirds": {
                "definition": "equal height along z between the lowest and highest lung slice",
                "lung_slices": [first, last],
                "lower": list(self.thirds_slices[0]),
                "middle": list(self.thirds_slices[1]),
                "upper": list(self.thirds_slices[2]),
            },
            "regions": self.to_table(),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def write_csv(
        self,
        path: str | os.PathLike[str],
        extra_columns: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Path:
        """Write :meth:`to_table` as CSV, atomically (temp file + rename).

        ``extra_columns`` maps a region name to more columns of its row (e.g.
        the share of each emphysema subtype); every region must have the same keys.
        """
        rows: list[dict[str, Any]] = [dict(row) for row in self.to_table()]
        for row in rows:
            row.update((extra_columns or {}).get(str(row["region"]), {}))
        path = Path(path)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def write_json(self, path: str | os.PathLike[str], **extra: Any) -> Path:
        """Write :meth:`to_dict` (after ``extra`` keys) as JSON, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**extra, **self.to_dict()}, indent=2) + "\n")
        return path


def quantify_emphysema(
    scan: Volume,
    lungs: LungMasks | None = None,
    *,
    threshold_hu: float = LAA_THRESHOLD_HU,
) -> EmphysemaReport:
    """Score emphysema on a chest CT: %LAA, %LAA-910 and Perc15 for every region.

    Parameters
    ----------
    scan : Volume
        Chest CT in Hounsfield units, ``(z, y, x)`` in display orientation.
    lungs : LungMasks, optional
        Lung labels on ``scan``'s grid (1 right, 2 left); found with
        :func:`~napari_fewlabel.infer.lungs.segment_lungs` when not given.
    threshold_hu : float
        Low-attenuation threshold in HU; voxels strictly below it count.

    Returns
    -------
    EmphysemaReport

    Raises
    ------
    FewLabelError
        Not CT in HU, no lung found, or ``lungs`` drawn on another grid.
    """
    require_ct_in_hu(scan)
    if lungs is None:
        lungs = segment_lungs(scan)
    elif lungs.labels.shape != scan.shape:
        raise FewLabelError(
            f"The lung labels have shape {lungs.labels.shape} but the scan has {scan.shape}: "
            "use lungs segmented on this scan."
        )
    labels = lungs.labels
    if not labels.any():
        raise FewLabelError("The lung mask is empty: there is nothing to score in this scan.")
    hu = scan.array
    lung = labels > 0
    low_attenuation = lung & (hu < threshold_hu)

    lung_slices = np.nonzero(lung.any(axis=(1, 2)))[0]
    lowest, n_slices = int(lung_slices[0]), int(lung_slices[-1] - lung_slices[0] + 1)
    # Slice lowest + i is in third floor(3 i / n): third t starts at ceil(t n / 3).
    starts = [lowest - (-t * n_slices // 3) for t in range(4)]
    thirds_slices = tuple((starts[t], starts[t + 1] - 1) for t in range(3))

    masks = _region_masks(labels, thirds_slices)
    regions = tuple(
        _scores(name, hu[masks[name]], threshold_hu, lungs.voxel_ml) for name in REGIONS
    )
    return EmphysemaReport(
        threshold_hu=float(threshold_hu),
        regions=regions,
        lungs=lungs,
        low_attenuation=low_attenuation,
        thirds_slices=thirds_slices,
    )


def _region_masks(
    labels: np.ndarray, thirds_slices: tuple[tuple[int, int], ...]
) -> dict[str, np.ndarray]:
    """Lung voxels of every region in :data:`REGIONS` from the lung labels and the thirds."""
    lung = labels > 0

    def in_slices(first: int, last: int) -> np.ndarray:
        mask = np.zeros(lung.shape, dtype=bool)
        mask[first : last + 1] = lung[first : last + 1]
        return mask

    return {
        "both lungs": lung,
        "right lung": labels == RIGHT_LUNG,
        "left lung": labels == LEFT_LUNG,
        "upper third": in_slices(*thirds_slices[2]),
        "middle third": in_slices(*thirds_slices[1]),
        "lower third": in_slices(*thirds_slices[0]),
    }


def _scores(name: str, values: np.ndarray, threshold_hu: float, voxel_ml: float) -> RegionScores:
    """Scores of one region from its voxel values (HU, 1D)."""
    count = int(values.size)
    if count == 0:
        return RegionScores(name, 0.0, 0, None, None, None)
    return RegionScores(
        region=name,
        volume_ml=count * voxel_ml,
        voxels=count,
        laa_percent=100.0 * np.count_nonzero(values < threshold_hu) / count,
        laa_910_percent=100.0 * np.count_nonzero(values < LAA_910_HU) / count,
        perc15_hu=float(np.percentile(values, DENSITY_PERCENTILE)),
    )


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)
