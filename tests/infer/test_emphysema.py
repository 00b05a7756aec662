"""Emphysema scores: checked against plain numpy on real scans and exact on a phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chest_phantom import EMPHYSEMA_SHARE, synthetic_chest
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.emphysema import REGIONS, quantify_emphysema
from napari_fewlabel.infer.lungs import LEFT_LUNG, RIGHT_LUNG, segment_lungs
from napari_fewlabel.io import Volume
from segmented_chests import CHEST_NAMES, segmented_chest


def _reference_region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The regions, rebuilt here: thirds of the lung height, by slice index."""
    lung = labels > 0
    z = np.nonzero(lung.any(axis=(1, 2)))[0]
    lowest, height = z.min(), z.max() - z.min() + 1
    third_of_slice = np.full(lung.shape[0], -1)
    for k in range(lowest, lowest + height):
        third_of_slice[k] = int(np.floor(3.0 * (k - lowest) / height))
    per_slice = third_of_slice[:, None, None]
    return {
        "both lungs": lung,
        "right lung": labels == RIGHT_LUNG,
        "left lung": labels == LEFT_LUNG,
        "lower third": lung & (per_slice == 0),
        "middle third": lung & (per_slice == 1),
        "upper third": lung & (per_slice == 2),
    }


def _third_sizes(lung: np.ndarray) -> list[int]:
    """Voxels of one lung per third (the phantom's lungs span the same heights)."""
    masks = _reference_region_masks(lung.astype(np.uint8))
    return [int(masks[f"{t} third"].sum()) for t in ("lower", "middle", "upper")]


@pytest.mark.parametrize("name", CHEST_NAMES)
def test_scores_equal_plain_numpy_on_the_same_mask(name):
    chest = segmented_chest(name)
    scan, lungs = chest.scan, chest.lungs
    report = quantify_emphysema(scan, lungs)
    hu = scan.array
    voxel_ml = np.prod(scan.spacing_mm) / 1000.0
    masks = _reference_region_masks(lungs.labels)
    assert [s.region for s in report.regions] == list(REGIONS)
    for name, mask in masks.items():
        values = hu[mask].astype(np.float64)
        scores = report.region(name)
        assert scores.voxels == mask.sum()
        assert scores.volume_ml == pytest.approx(mask.sum() * voxel_ml)
        assert scores.laa_percent == pytest.approx(100 * np.mean(values < -950), abs=0.01)
        assert scores.laa_910_percent == pytest.approx(100 * np.mean(values < -910), abs=0.01)
        assert scores.perc15_hu == pytest.approx(np.percentile(values, 15), abs=0.5)
    assert np.array_equal(report.low_attenuation, (lungs.labels > 0) & (hu < -950))
    thirds = report.region("upper third").voxels + report.region("middle third").voxels
    assert thirds + report.region("lower third").voxels == report.region("both lungs").voxels


def test_lung1_has_little_emphysema():
    """The scan is known for a low %LAA-950 (about 3%)."""
    lung1 = segmented_chest("lung1")
    report = quantify_emphysema(lung1.scan, lung1.lungs)
    assert report.laa_percent is not None
    assert 1.0 <= report.laa_percent <= 5.0
    assert -960 <= report.region("both lungs").perc15_hu <= -850


def test_synthetic_chest_gives_the_known_share_exactly():
    chest = synthetic_chest()
    report = quantify_emphysema(chest.scan)  # segments the lungs itself
    assert np.array_equal(report.lungs.labels == RIGHT_LUNG, chest.right_lung)
    assert np.array_equal(report.low_attenuation, chest.emphysema)
    truth = _reference_region_masks(
        np.where(chest.right_lung, RIGHT_LUNG, 0) + np.where(chest.left_lung, LEFT_LUNG, 0)
    )
    for name, region in truth.items():
        known = 100.0 * chest.emphysema[region].sum() / region.sum()
        assert report.region(name).laa_percent == pytest.approx(known, abs=1e-9)
    # The phantom's parenchyma is -900..-800 HU: nothing between -950 and -910.
    assert report.region("both lungs").laa_910_percent == pytest.approx(report.laa_percent)
    # And the shares are those the phantom was built with, rounded to whole voxels.
    assert report.region("right lung").laa_percent == pytest.approx(
        100 * np.average(EMPHYSEMA_SHARE["right"], weights=_third_sizes(chest.right_lung)),
        abs=0.01,
    )
    upper, lower = report.region("upper third"), report.region("lower third")
    assert upper.laa_percent > 5 * lower.laa_percent  # upper-zone predominant, as built


def test_threshold_is_a_parameter():
    chest = synthetic_chest()
    lungs = segment_lungs(chest.scan)
    strict = quantify_emphysema(chest.scan, lungs, threshold_hu=-990)
    standard = quantify_emphysema(chest.scan, lungs)
    assert strict.threshold_hu == -990
    assert 0 < strict.laa_percent < standard.laa_percent
    assert strict.low_attenuation.sum() == np.count_nonzero(
        (lungs.labels > 0) & (chest.scan.array < -990)
    )


def test_table_and_json():
    report = quantify_emphysema(synthetic_chest().scan)
    rows = report.to_table()
    assert [row["region"] for row in rows] == list(REGIONS)
    assert set(rows[0]) == {
        "region",
        "lung_volume_ml",
        "voxels",
        "threshold_hu",
        "laa_percent",
        "laa_910_percent",
        "perc15_hu",
    }
    document = json.loads(report.to_json())
    assert document["threshold_hu"] == -950
    assert document["laa_percent"] == pytest.approx(report.laa_percent, abs=1e-3)
    lower, middle, upper = (document["thirds"][k] for k in ("lower", "middle", "upper"))
    assert lower[0] == document["thirds"]["lung_slices"][0]
    assert lower[1] + 1 == middle[0] and middle[1] + 1 == upper[0]
    assert upper[1] == document["thirds"]["lung_slices"][1]
    assert document["regions"] == rows


def test_lungs_from_another_scan_are_refused():
    chest = synthetic_chest()
    lungs = segment_lungs(chest.scan)
    other = Volume.from_array(chest.scan.array[:-1], chest.scan.spacing_mm, modality="CT")
    with pytest.raises(FewLabelError, match="segmented on this scan"):
        quantify_emphysema(other, lungs)
