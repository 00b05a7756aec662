from __future__ import annotations

import numpy as np
import pytest

from napari_fewlabel.data.phantoms import (
    AORTA,
    CARDIAC_CLASSES,
    LEFT_ATRIUM,
    LV_BLOOD,
    LV_MYOCARDIUM,
    RV_BLOOD,
    cardiac_phantom,
)
from napari_fewlabel.errors import FewLabelError


@pytest.fixture(scope="module")
def mr():
    return cardiac_phantom("MR", seed=0)


@pytest.fixture(scope="module")
def ct():
    return cardiac_phantom("CT", seed=0)


def test_same_seed_same_volume_other_seed_other_anatomy(mr):
    again = cardiac_phantom("MR", seed=0)
    np.testing.assert_array_equal(again.image.array, mr.image.array)
    np.testing.assert_array_equal(again.labels.array, mr.labels.array)
    other = cardiac_phantom("MR", seed=1)
    assert np.mean(other.labels.array != mr.labels.array) > 0.001


def test_mr_and_ct_share_anatomy_and_geometry(mr, ct):
    np.testing.assert_array_equal(mr.labels.array, ct.labels.array)
    assert mr.image.shape == ct.image.shape == (48, 128, 128)
    assert mr.image.spacing_mm == pytest.approx((2.0, 1.5, 1.5))
    np.testing.assert_allclose(mr.image.affine, mr.labels.affine)
    assert (mr.image.modality, ct.image.modality) == ("MR", "CT")
    assert mr.image.header["synthetic"] is True


def test_every_class_is_present_with_documented_ids(mr):
    counts = np.bincount(mr.labels.array.ravel(), minlength=len(CARDIAC_CLASSES))
    assert len(counts) == len(CARDIAC_CLASSES) == 6
    assert all(counts[1:] > 1000)
    assert [c.index for c in CARDIAC_CLASSES] == [
        0,
        LV_BLOOD,
        LV_MYOCARDIUM,
        RV_BLOOD,
        LEFT_ATRIUM,
        AORTA,
    ]
    assert len({c.color for c in CARDIAC_CLASSES}) == 6


def test_ct_is_in_hounsfield_units(ct):
    hu, lab = ct.image.array, ct.labels.array
    assert hu.dtype == np.int16
    assert np.median(hu[:, :3, :3]) == pytest.approx(-1000, abs=60)  # air in the corner
    assert 330 < np.median(hu[lab == LV_BLOOD]) < 430  # contrast-filled blood
    assert 50 < np.median(hu[lab == LV_MYOCARDIUM]) < 170
    assert np.median(hu[lab == AORTA]) > np.median(hu[lab == LV_MYOCARDIUM]) + 200


def test_contrast_order_differs_between_mr_and_ct(mr, ct):
    """Fat is brighter than myocardium on MR and darker on CT: an MR model cannot just work on CT."""
    lab = mr.labels.array
    body_fat_mr = np.median(mr.image.array[:, 64, 2:8])  # skin-fat band at the side
    body_fat_ct = np.median(ct.image.array[:, 64, 2:8])
    myo_mr = np.median(mr.image.array[lab == LV_MYOCARDIUM])
    myo_ct = np.median(ct.image.array[lab == LV_MYOCARDIUM])
    assert np.median(mr.image.array[lab == LV_BLOOD]) > 2 * myo_mr
    assert body_fat_mr > myo_mr
    assert body_fat_ct < myo_ct


def test_mr_has_rician_floor_and_bias(mr):
    img = mr.image.array
    assert img.dtype == np.float32 and img.min() >= 0
    air = img[:, :3, :3]
    assert 5 < air.mean() < 60  # Rician noise floor: positive mean where the signal is zero
    lab = mr.labels.array
    blood = img[lab == LV_BLOOD]
    assert blood.std() / blood.mean() > 0.05  # bias field + noise spread one tissue's values


def test_anatomy_changes_along_z_so_copying_labelled_slices_is_not_enough(mr):
    lab = mr.labels.array
    labelled = np.array([17, 31])
    nearest = labelled[np.abs(np.arange(lab.shape[0])[:, None] - labelled[None]).argmin(axis=1)]
    copied = lab[nearest]
    rest = np.setdiff1d(np.arange(lab.shape[0]), labelled)
    dices = []
    for k in range(1, 6):
        p, t = copied[rest] == k, lab[rest] == k
        dices.append(2 * np.sum(p & t) / (p.sum() + t.sum()))
    assert np.mean(dices) < 0.75


def test_shape_is_parameterisable():
    ph = cardiac_phantom("CT", seed=2, shape=(20, 64, 96), spacing_mm=(3.0, 1.0, 1.0))
    assert ph.image.shape == (20, 64, 96)
    assert set(np.unique(ph.labels.array)) == set(range(6))


def test_bad_arguments_raise():
    with pytest.raises(FewLabelError, match="MR' or 'CT"):
        cardiac_phantom("PET")  # type: ignore[arg-type]
    with pytest.raises(FewLabelError, match="too small"):
        cardiac_phantom("MR", shape=(4, 64, 64))
