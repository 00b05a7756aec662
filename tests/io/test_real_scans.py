"""Read real scans, export a mask, read it back with nibabel: same grid, same world point."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import real_data
from napari_fewlabel.io import load_volume, save_labels
from napari_fewlabel.io.volume import RAS_FROM_LPS


def _reference_affine(path) -> np.ndarray:
    """The source's voxel->RAS affine as an independent reader reports it."""
    name = str(path)
    if name.endswith((".nii", ".nii.gz")):
        return nib.load(name).affine
    image = sitk.ReadImage(name)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return RAS_FROM_LPS @ lps


REAL_FILES = {
    "itk_t1": real_data.itk_t1,
    "nibabel_anatomical": real_data.nibabel_anatomical,
    "lung1_nrrd": real_data.lung1_image,
    "dipy_non_orthonormal": real_data.dipy_s0_10slices,
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_exported_mask_lands_on_the_same_world_point(name, tmp_path):
    source = REAL_FILES[name]()
    scan = load_volume(source)
    mask = np.zeros(scan.shape, np.uint8)
    marked = tuple(s // 3 for s in scan.shape)
    mask[marked] = 1

    out = save_labels(mask, like=scan, path=tmp_path / "mask.nii.gz")

    saved = nib.load(out)
    reference = _reference_affine(source)
    assert np.allclose(saved.affine, reference, atol=1e-4)
    assert saved.shape == scan.grid.shape  # the file's own voxel grid, not the display grid
    assert saved.get_data_dtype() == np.uint8
    ijk = np.argwhere(np.asarray(saved.dataobj) == 1)
    assert len(ijk) == 1
    world_saved = saved.affine @ np.r_[ijk[0], 1]
    world_display = scan.affine @ np.r_[marked, 1]
    assert np.allclose(world_saved, world_display, atol=1e-4)


def test_nifti_xform_codes_are_preserved(tmp_path):
    source = real_data.itk_t1()  # qform_code 2, sform_code 1
    scan = load_volume(source)
    out = save_labels(np.zeros(scan.shape, np.uint8), like=scan, path=tmp_path / "m.nii.gz")
    src_hdr, out_hdr = nib.load(source).header, nib.load(out).header
    assert int(out_hdr["qform_code"]) == int(src_hdr["qform_code"]) == 2
    assert int(out_hdr["sform_code"]) == int(src_hdr["sform_code"]) == 1
    assert np.allclose(out_hdr.get_qform(), src_hdr.get_qform(), atol=1e-4)
    assert np.allclose(out_hdr.get_sform(), src_hdr.get_sform(), atol=1e-4)


def test_labels_round_trip_voxel_for_voxel(tmp_path):
    """The ITK k-means labels, read and re-exported, equal the file's voxels exactly."""
    labels_path = real_data.itk_t1_labels()
    labels = load_volume(labels_path)
    scan = load_volume(real_data.itk_t1())
    out = save_labels(labels.array, like=scan, path=tmp_path / "kmeans.nii.gz")
    assert np.array_equal(
        np.asarray(nib.load(out).dataobj), np.asarray(nib.load(labels_path).dataobj)
    )


def test_large_label_values_use_uint16(tmp_path):
    scan = load_volume(real_data.nibabel_anatomical())
    mask = np.zeros(scan.shape, np.int64)
    mask[0, 0, 0] = 300
    out = save_labels(mask, like=scan, path=tmp_path / "m.nii")
    assert nib.load(out).get_data_dtype() == np.uint16


def test_lung1_is_ct_in_hu_with_its_spacing():
    scan = load_volume(real_data.lung1_image())
    assert scan.modality == "CT"
    assert scan.shape == (48, 512, 512)
    assert scan.spacing_mm == pytest.approx((5.0, 0.5703125, 0.5703125))
    assert scan.array.min() == -1024


def test_mri_is_not_mistaken_for_ct():
    # anatomical.nii has negative values (SPM-normalised) but no air at -1000 HU.
    assert load_volume(real_data.nibabel_anatomical()).modality == "MR"
    assert load_volume(real_data.itk_t1()).modality == "MR"


def test_non_orthonormal_affine_is_read_by_nibabel():
    path = real_data.dipy_s0_10slices()
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))  # why nibabel reads NIfTI here
    scan = load_volume(path)
    assert scan.shape[0] * scan.shape[1] * scan.shape[2] == np.prod(nib.load(path).shape[:3])


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
def test_itk_formats_round_trip(tmp_path, suffix):
    """A real scan rewritten as MetaImage/NRRD reads back with identical geometry."""
    reference = load_volume(real_data.nibabel_anatomical())
    image = sitk.ReadImage(str(real_data.nibabel_anatomical()))
    path = tmp_path / f"anatomical{suffix}"
    sitk.WriteImage(image, str(path))
    again = load_volume(path)
    assert np.allclose(again.affine, reference.affine, atol=1e-4)
    assert np.array_equal(again.array, reference.array)
