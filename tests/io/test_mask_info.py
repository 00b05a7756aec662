"""A saved mask keeps its classes and empty-slice marks; masks are told apart from scans."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import real_data
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import MaskInfo, load_volume, looks_like_mask, read_mask_info, save_labels
from napari_fewlabel.io.mask_info import EXTENSION_CODE, EXTENSION_KEY

CLASSES = (
    {"index": 0, "name": "background", "color": [0, 0, 0]},
    {"index": 1, "name": "tumour", "color": [230, 25, 75]},
    {"index": 2, "name": "oedema", "color": [60, 180, 75]},
)


@pytest.fixture(scope="module")
def lung1():
    return load_volume(real_data.lung1_image())


def _mask(scan):
    mask = np.zeros(scan.shape, np.uint8)
    mask[20, 100:110, 300:310] = 1
    mask[22, 100:104, 300:304] = 2
    return mask


def test_classes_and_marks_survive_a_round_trip(lung1, tmp_path):
    info = MaskInfo(classes=CLASSES, empty_axis=0, empty_slices=(40, 3))
    path = save_labels(_mask(lung1), like=lung1, path=tmp_path / "annotation.nii.gz", info=info)

    back = read_mask_info(path)
    assert back == MaskInfo(classes=CLASSES, empty_axis=0, empty_slices=(3, 40))
    # The voxels and the grid are those of a plain mask.
    reopened = load_volume(path)
    assert np.array_equal(reopened.array, _mask(lung1))
    np.testing.assert_allclose(reopened.affine, lung1.affine, atol=1e-4)
    # What the file holds: one comment extension with our JSON.
    (extension,) = nib.load(path).header.extensions
    assert extension.get_code() == EXTENSION_CODE
    payload = json.loads(bytes(extension.get_content()).rstrip(b"\x00"))
    assert payload[EXTENSION_KEY]["empty_slices"] == {"axis": 0, "slices": [3, 40]}


def test_itk_reads_the_mask_on_the_scans_grid_despite_the_extension(lung1, tmp_path):
    info = MaskInfo(classes=CLASSES, empty_slices=(3,))
    path = save_labels(_mask(lung1), like=lung1, path=tmp_path / "m.nii.gz", info=info)
    mask = sitk.ReadImage(str(path))
    scan = sitk.ReadImage(str(real_data.lung1_image()))
    assert mask.GetSize() == scan.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), scan.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetSpacing(), scan.GetSpacing(), atol=1e-5)
    assert sitk.GetArrayFromImage(mask).sum() == _mask(lung1).sum()


def test_a_mask_saved_without_info_has_none_but_is_still_a_mask(lung1, tmp_path):
    path = save_labels(_mask(lung1), like=lung1, path=tmp_path / "m.nii.gz")
    assert read_mask_info(path) is None
    assert nib.load(path).header.extensions == []
    assert looks_like_mask(load_volume(path), path)


def test_marks_outside_the_mask_are_refused_and_nothing_is_written(lung1, tmp_path):
    info = MaskInfo(empty_axis=0, empty_slices=(3, lung1.shape[0]))
    with pytest.raises(FewLabelError, match=r"marked empty but axis 0 of the mask has"):
        save_labels(_mask(lung1), like=lung1, path=tmp_path / "m.nii.gz", info=info)
    assert list(tmp_path.iterdir()) == []


def test_other_comments_are_not_ours_and_a_damaged_one_is_ignored(tmp_path, caplog):
    def with_comment(name, text):
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
        img.header.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE, text))
        nib.save(img, tmp_path / name)
        return tmp_path / name

    assert read_mask_info(with_comment("a.nii", b"made by hand in 2019")) is None
    assert read_mask_info(with_comment("b.nii", b'{"tool": "other"}')) is None
    damaged = json.dumps({EXTENSION_KEY: {"empty_slices": {"axis": 7}}}).encode()
    with caplog.at_level(logging.WARNING):
        assert read_mask_info(with_comment("c.nii", damaged)) is None
    assert "damaged napari-fewlabel extension" in caplog.text
    assert read_mask_info(real_data.lung1_image()) is None  # not NIfTI


SCANS = {
    "MR T1 (uint8 NIfTI)": real_data.itk_t1,
    "MR (big-endian int16 NIfTI)": real_data.nibabel_anatomical,
    "CT (int16 NRRD)": real_data.lung2_image,
    "MR diffusion (uint16 NIfTI)": real_data.dipy_s0_10slices,
}
MASKS = {
    "ITK k-means segmentation (uint8 NIfTI, no intent)": real_data.itk_t1_labels,
    "pyradiomics lung1 tumour (NRRD)": real_data.lung1_label,
    "pyradiomics lung2 tumour (NRRD)": real_data.lung2_label,
}


@pytest.mark.parametrize("name", sorted(SCANS))
def test_real_scans_are_not_masks(name):
    path = SCANS[name]()
    assert not looks_like_mask(load_volume(path), path)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_from_other_tools_are_masks(name):
    path = MASKS[name]()
    assert read_mask_info(path) is None  # they declare nothing
    assert looks_like_mask(load_volume(path), path)


def test_the_label_intent_alone_makes_a_mask(tmp_path):
    """Float voxels fail the integer rule; the header's intent "label" still says mask."""
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = 1.0
    for intent in ("label", "none"):
        img = nib.Nifti1Image(data, np.eye(4))
        img.header.set_intent(intent)
        path = tmp_path / f"{intent}.nii.gz"
        nib.save(img, path)
        assert looks_like_mask(load_volume(path), path) is (intent == "label")
    data[1, 2, 4] = 0.5  # not a label value: an image, whatever the header says
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "fractional.nii.gz")
    assert not looks_like_mask(
        load_volume(tmp_path / "fractional.nii.gz"), tmp_path / "fractional.nii.gz"
    )
