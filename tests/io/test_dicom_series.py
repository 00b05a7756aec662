"""DICOM series: grouping, sorting by position, geometry from ImagePositionPatient."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

import real_data
from dicom_writer import write_ct_series
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume, save_labels
from napari_fewlabel.io.volume import RAS_FROM_LPS

pytest.importorskip("pydicom")


def test_lung1_series_matches_the_nrrd_voxel_for_voxel(lung1_dicom):
    from_dicom = load_volume(lung1_dicom.folder)
    from_nrrd = load_volume(real_data.lung1_image())
    assert from_dicom.modality == "CT"
    assert np.array_equal(from_dicom.array, from_nrrd.array)
    assert np.allclose(from_dicom.affine, from_nrrd.affine, atol=1e-3)


def test_largest_series_wins_and_the_others_are_named(lung1_dicom):
    scan = load_volume(lung1_dicom.folder)
    assert scan.header["files"] == lung1_dicom.hu.shape[0]
    assert scan.header["other_series"] == ["#1 Scout (2 images)"]


def test_exported_mask_matches_world_coordinates_from_image_position(lung1_dicom, tmp_path):
    scan = load_volume(lung1_dicom.folder)
    mask = np.zeros(scan.shape, np.uint8)
    # Display (z, y, x) = (slice along +S, row along +P, column along +L) for this series.
    z, y, x = 17, 200, 301
    mask[z, y, x] = 1
    out = save_labels(mask, like=scan, path=tmp_path / "nodule.nii.gz")

    saved = nib.load(out)
    ijk = np.argwhere(np.asarray(saved.dataobj))[0]
    world_ras = saved.affine @ np.r_[ijk, 1]
    expected_lps = lung1_dicom.world_lps(slice_index=z, row=y, column=x)
    assert np.allclose(world_ras[:3], (RAS_FROM_LPS[:3, :3] @ expected_lps), atol=1e-3)


def test_oblique_series_keeps_its_rotation(tmp_path):
    angle = np.deg2rad(20)
    row_cos = np.array([np.cos(angle), np.sin(angle), 0.0])
    col_cos = np.array([-np.sin(angle), np.cos(angle), 0.0])
    hu = np.random.default_rng(1).integers(-1000, 1000, size=(6, 12, 10)).astype(np.int16)
    series = write_ct_series(
        tmp_path / "oblique",
        hu,
        first_position=np.array([-50.0, 20.0, 100.0]),
        pixel_spacing=(0.8, 0.6),
        slice_step_mm=2.5,
        row_cosines=row_cos,
        col_cosines=col_cos,
    )
    scan = load_volume(series.folder)
    mask = np.zeros(scan.shape, np.uint8)
    mask[3, 4, 5] = 1
    saved = nib.load(save_labels(mask, like=scan, path=tmp_path / "m.nii.gz"))
    ijk = np.argwhere(np.asarray(saved.dataobj))[0]
    world_lps = RAS_FROM_LPS @ saved.affine @ np.r_[ijk, 1]
    assert np.allclose(world_lps[:3], series.world_lps(3, 4, 5), atol=1e-3)
    assert hu[3, 4, 5] == scan.array[3, 4, 5]


def test_ct5n_is_sorted_by_position_not_instance_number():
    """CT5N's InstanceNumber rises while its z position falls."""
    import pydicom

    folder = real_data.pydicom_tests() / "dicomdirtests/98892001/CT5N"
    scan = load_volume(folder)
    by_z = sorted(
        (pydicom.dcmread(f) for f in folder.iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    assert int(by_z[0].InstanceNumber) > int(by_z[-1].InstanceNumber)
    hu = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in by_z]
    assert np.array_equal(scan.array, np.stack(hu))  # inferior slice first, as displayed
    # voxel (0, 0, 0) sits at the lowest slice's ImagePositionPatient.
    lps0 = RAS_FROM_LPS @ scan.grid.affine @ np.array([0, 0, 0, 1.0])
    assert np.allclose(lps0[:3], [float(v) for v in by_z[0].ImagePositionPatient], atol=1e-3)


def test_missing_slices_are_refused():
    folder = real_data.pydicom_tests() / "dicomdirtests/77654033/CT2"
    with pytest.raises(FewLabelError, match=r"not evenly spaced.*missing"):
        load_volume(folder)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FewLabelError, match="No DICOM images"):
        load_volume(tmp_path)


def test_single_slice_series_is_refused():
    folder = real_data.pydicom_tests() / "dicomdirtests/98892003/MR2"
    with pytest.raises(FewLabelError, match="single slice"):
        load_volume(folder)


def test_two_images_at_one_position_are_refused(tmp_path, lung1_dicom):
    folder = tmp_path / "dupes"
    shutil.copytree(lung1_dicom.folder, folder, ignore=shutil.ignore_patterns("scout"))
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "copy_of_first")
    with pytest.raises(FewLabelError, match="share one slice position"):
        load_volume(folder)


def test_a_dcm_file_opens_its_series(lung1_dicom):
    one_file = next(p for p in lung1_dicom.folder.iterdir() if p.is_file())
    renamed = one_file.with_suffix(".dcm")
    one_file.rename(renamed)
    try:
        assert load_volume(renamed).shape[0] == lung1_dicom.hu.shape[0]
    finally:
        renamed.rename(one_file)
