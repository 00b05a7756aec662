"""Lung segmentation on real chest CTs (lung1, lung2) and on a synthetic chest."""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

import real_data
from chest_phantom import synthetic_chest
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import LEFT_LUNG, RIGHT_LUNG, segment_lungs
from napari_fewlabel.io import Volume, load_volume
from segmented_chests import CHEST_NAMES, segmented_chest

# ------------------------------------------------------------------ real scans


@pytest.mark.parametrize("name", CHEST_NAMES)
def test_two_lungs_each_on_the_patients_own_side(name):
    chest = segmented_chest(name)
    labels = chest.lungs.labels
    scan = chest.scan
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    centres = {}
    for value in (RIGHT_LUNG, LEFT_LUNG):
        lung = labels == value
        parts, _ = ndi.label(lung)
        # One lung is one piece (a stray speck may be cut off by a slice edge).
        assert np.bincount(parts.ravel())[1:].max() >= 0.99 * lung.sum()
        centres[value] = np.argwhere(lung).mean(axis=0)
    # Display axis 2 points toward the patient's left: the right lung has smaller x.
    assert centres[RIGHT_LUNG][2] < scan.shape[2] / 2 < centres[LEFT_LUNG][2]
    # And in world coordinates (RAS+: x grows toward the patient's right).
    world = {v: scan.affine @ np.r_[c, 1.0] for v, c in centres.items()}
    assert world[RIGHT_LUNG][0] > world[LEFT_LUNG][0] + 100.0


@pytest.mark.parametrize("name", CHEST_NAMES)
def test_lung_volumes_are_plausible(name):
    """Ranges from physiology, widened for what each scan covers.

    Adult lungs at CT inspiration hold about 3-7 L together, the right lung
    about 55% of it (the heart sits on the left). lung1 covers 48 x 5 mm = 24 cm
    and its lowest slice still shows lung (the bases are cut off), so its total
    can fall below that; lung2 covers 30 cm, apex to the upper abdomen.
    """
    chest = segmented_chest(name)
    lungs = chest.lungs
    lung_slices = np.nonzero(lungs.lungs.any(axis=(1, 2)))[0]
    height_mm = (lung_slices[-1] - lung_slices[0] + 1) * lungs.spacing_mm[0]
    assert 180.0 <= height_mm <= 300.0
    right, left = lungs.volume_ml("right"), lungs.volume_ml("left")
    assert 800.0 <= left <= 3500.0
    assert 800.0 <= right <= 3500.0
    assert 1.0 <= right / left <= 1.8
    assert 2000.0 <= lungs.volume_ml() <= 7000.0
    assert lungs.volume_ml() == pytest.approx(right + left)
    expected = np.count_nonzero(lungs.labels) * np.prod(chest.scan.spacing_mm) / 1000
    assert lungs.volume_ml() == pytest.approx(expected)


@pytest.mark.parametrize("name", CHEST_NAMES)
def test_no_lung_voxel_touches_the_air_outside_the_patient(name):
    chest = segmented_chest(name)
    air = chest.scan.array < -320
    regions, _ = ndi.label(air)
    edges = [regions[:, 0], regions[:, -1], regions[:, :, 0], regions[:, :, -1]]
    outside = np.isin(regions, np.setdiff1d(np.concatenate([e.ravel() for e in edges]), [0]))
    assert outside.sum() > 0.2 * outside.size  # the test itself found the outside air
    lungs = chest.lungs.lungs
    assert not (ndi.binary_dilation(outside) & lungs).any()


@pytest.mark.parametrize("name", CHEST_NAMES)
def test_trachea_is_found_and_kept_out_of_the_lungs(name):
    """Independently find the trachea in the highest lung slice: the largest pure-air
    region between the lungs, in the middle fifth of the body's width."""
    chest = segmented_chest(name)
    scan, lungs = chest.scan, chest.lungs
    top = int(np.nonzero(lungs.lungs.any(axis=(1, 2)))[0][-1])
    body_columns = np.nonzero((scan.array[top] > -320).any(axis=0))[0]
    middle = 0.5 * (body_columns[0] + body_columns[-1])
    regions, n = ndi.label(scan.array[top] < -950)
    candidates = [
        r
        for r in range(1, n + 1)
        if abs(np.nonzero(regions == r)[1].mean() - middle) < 0.1 * len(body_columns)
        and 30 <= np.count_nonzero(regions == r) * np.prod(scan.spacing_mm[1:]) <= 900
    ]
    assert candidates, "no trachea-like region in the top lung slice"
    trachea = regions == max(candidates, key=lambda r: np.count_nonzero(regions == r))
    assert not (lungs.labels[top] > 0)[trachea].any()
    assert lungs.airway[top][trachea].all()
    assert not (lungs.airway & lungs.lungs).any()


def test_lung1_nodule_is_inside_the_right_lung():
    lung1 = segmented_chest("lung1")
    nodule = lung1.lesion
    assert nodule.sum() > 500
    assert np.all(lung1.lungs.labels[nodule] == RIGHT_LUNG)


def test_lung2_tumour_against_the_chest_wall_is_only_partly_lung():
    """A documented limit: a 4-5 cm mass against the posterior chest wall is soft
    tissue at the lung's border, so only the part that lung surrounds is filled."""
    lung2 = segmented_chest("lung2")
    labels_in_tumour = lung2.lungs.labels[lung2.lesion]
    assert set(np.unique(labels_in_tumour)) <= {0, LEFT_LUNG}
    assert 0.1 <= np.mean(labels_in_tumour > 0) <= 0.9


def test_the_same_lungs_at_another_voxel_size():
    """lung1 resampled to 1.5 mm isotropic: same lungs within a few percent."""
    scan = load_volume(real_data.lung1_image())
    native = segment_lungs(scan)
    zoom = np.asarray(scan.spacing_mm) / 1.5
    iso = ndi.zoom(scan.array.astype(np.float32), zoom, order=1).round().astype(np.int16)
    resampled = segment_lungs(Volume.from_array(iso, (1.5, 1.5, 1.5), modality="CT"))
    for which in ("right", "left"):
        assert resampled.volume_ml(which) == pytest.approx(native.volume_ml(which), rel=0.03)
    assert resampled.airway.any()


# ------------------------------------------------------------------- synthetic


def test_separate_lungs_are_found_exactly():
    chest = synthetic_chest()
    lungs = segment_lungs(chest.scan)
    assert np.array_equal(lungs.labels == RIGHT_LUNG, chest.right_lung)
    assert np.array_equal(lungs.labels == LEFT_LUNG, chest.left_lung)
    assert not lungs.lungs_were_split
    assert not lungs.airway.any()  # no trachea in this phantom


def test_touching_lungs_are_split_at_the_junction():
    chest = synthetic_chest(touching=True)
    assert ndi.label(chest.right_lung | chest.left_lung)[1] == 1  # the phantom is one piece
    lungs = segment_lungs(chest.scan)
    assert lungs.lungs_were_split
    assert np.count_nonzero((lungs.labels == RIGHT_LUNG) != chest.right_lung) <= 50
    assert np.count_nonzero((lungs.labels == LEFT_LUNG) != chest.left_lung) <= 50


@pytest.mark.parametrize("spacing_mm", [(2.5, 1.5, 1.5), (2.0, 2.0, 2.0)])
def test_the_airway_joining_the_lungs_is_removed(spacing_mm):
    chest = synthetic_chest(with_airway=True, spacing_mm=spacing_mm)
    lungs = segment_lungs(chest.scan)
    # Removing the airway alone separated the lungs: no cut was needed.
    assert not lungs.lungs_were_split
    assert lungs.airway[chest.trachea].all()
    assert not (lungs.airway & lungs.lungs).any()
    for value, truth in ((RIGHT_LUNG, chest.right_lung), (LEFT_LUNG, chest.left_lung)):
        found = lungs.labels == value
        dice = 2 * np.count_nonzero(found & truth) / (found.sum() + truth.sum())
        assert dice > 0.99


# ---------------------------------------------------------------------- errors


def test_mr_scan_is_refused_with_what_to_do():
    scan = load_volume(real_data.itk_t1())
    assert scan.modality == "MR"
    with pytest.raises(FewLabelError, match=r"MR scan.*chest CT"):
        segment_lungs(scan)


def test_ct_without_rescale_is_refused_with_what_to_do():
    scan = load_volume(real_data.lung1_image())
    stored = (scan.array.astype(np.int32) + 1024).astype(np.uint16)  # raw values, air near 0
    raw = Volume.from_array(stored, scan.spacing_mm, modality="unknown")
    with pytest.raises(FewLabelError, match="RescaleIntercept"):
        segment_lungs(raw)


def test_ct_without_lungs_is_refused():
    """The abdominal slices of lung2 (below the lung bases): only bowel gas."""
    scan = load_volume(real_data.lung2_image())
    abdomen = Volume.from_array(scan.array[:5], scan.spacing_mm, modality="CT")
    with pytest.raises(FewLabelError, match="No lung found"):
        segment_lungs(abdomen)


def test_head_ct_is_refused():
    """A real head CT in HU (InVesalius' Cranium, 256x256x108): air, but no lung."""
    archive = real_data.require(real_data.INVESALIUS, "InVesalius Cranium head CT")
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        header = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        raw = tar.extractfile(members["matrix.dat"]).read()
    hu = np.frombuffer(raw, dtype="<i2").reshape(header["matrix"]["shape"])
    sx, sy, sz = header["spacing"]
    head = Volume.from_array(hu, (sz, sy, sx), modality="CT")
    with pytest.raises(FewLabelError, match=r"No lung found.*chest CT"):
        segment_lungs(head)
