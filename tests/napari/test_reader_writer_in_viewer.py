"""The npe2 reader and writers in a real napari viewer (Xvfb)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import real_data
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import METADATA_KEY, load_volume

PLUGIN = "napari-fewlabel"
pytestmark = pytest.mark.gui


def test_manifest_is_valid_and_found_through_the_entry_point():
    import subprocess
    import sys
    from importlib.metadata import entry_points

    import npe2

    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout

    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == PLUGIN]
    module, _, filename = entry.value.partition(":")
    manifest_file = Path(__import__(module).__file__).parent / filename
    repo_manifest = Path(__file__).parents[2] / "napari.yaml"
    assert manifest_file.read_text() == repo_manifest.read_text()  # one source of truth

    pm = npe2.PluginManager.instance()
    pm.discover()
    readers = [r.command for r in pm.get_manifest(PLUGIN).contributions.readers]
    assert readers == ["napari-fewlabel.get_reader"]


def _mha_copy(tmp_path: Path) -> Path:
    path = tmp_path / "anatomical.mha"
    sitk.WriteImage(sitk.ReadImage(str(real_data.nibabel_anatomical())), str(path))
    return path


SOURCES = {
    "nii.gz": lambda tmp, dcm: real_data.itk_t1(),
    "nii": lambda tmp, dcm: real_data.nibabel_anatomical(),
    "nrrd": lambda tmp, dcm: real_data.lung1_image(),
    "mha": lambda tmp, dcm: _mha_copy(tmp),
    "dicom folder": lambda tmp, dcm: dcm.folder,
    "inv3": lambda tmp, dcm: real_data.invesalius_head_ct(),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_open_each_file_type(make_napari_viewer, tmp_path, lung1_dicom, kind):
    path = SOURCES[kind](tmp_path, lung1_dicom)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)

    assert len(layers) == 1
    layer = layers[0]
    expected = load_volume(path)
    assert layer._type_string == "image"
    assert np.array_equal(np.asarray(layer.data), expected.array)
    assert np.allclose(layer.scale, expected.spacing_mm)
    assert np.allclose(layer.translate, expected.napari_translate())
    assert np.allclose(layer.metadata[METADATA_KEY]["affine"], expected.affine)
    if kind in ("nrrd", "dicom folder", "inv3"):
        assert tuple(layer.contrast_limits) == (-160.0, 240.0)  # CT soft-tissue window


def test_corrupt_file_gives_a_notification_and_no_layer(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        layers = viewer.open(bad, plugin=PLUGIN)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert layers == []
    assert len(viewer.layers) == 0
    assert any("Could not read broken.nii.gz" in n.message for n in seen)


def test_dicom_folder_with_other_series_names_them(make_napari_viewer, lung1_dicom):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        viewer.open(lung1_dicom.folder, plugin=PLUGIN)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert any("Also found: #1 Scout (2 images)" in n.message for n in seen)


def test_labels_layer_saved_through_napari_lines_up(make_napari_viewer, tmp_path):
    source = real_data.lung1_image()
    viewer = make_napari_viewer()
    (image,) = viewer.open(source, plugin=PLUGIN)
    labels = viewer.add_labels(
        np.zeros(image.data.shape, np.uint8),
        scale=image.scale,
        translate=image.translate,
        metadata=dict(image.metadata),
    )
    labels.data[20, 100, 300] = 2
    out = tmp_path / "mask.nii.gz"
    labels.save(str(out), plugin=PLUGIN)

    saved = nib.load(out)
    scan = load_volume(source)
    assert np.allclose(saved.affine, scan.grid.affine, atol=1e-4)
    ijk = np.argwhere(np.asarray(saved.dataobj) == 2)[0]
    assert np.allclose(saved.affine @ np.r_[ijk, 1], scan.affine @ np.r_[20, 100, 300, 1])


def test_napari_new_labels_button_layer_also_lines_up(make_napari_viewer, tmp_path):
    """napari's own 'New labels layer' copies scale/translate but not our metadata."""
    source = real_data.itk_t1()
    viewer = make_napari_viewer()
    (image,) = viewer.open(source, plugin=PLUGIN)
    viewer.layers.selection.active = image
    viewer._new_labels()
    labels = viewer.layers[-1]
    assert METADATA_KEY not in labels.metadata
    labels.data[60, 30, 70] = 1
    out = tmp_path / "mask.nii.gz"
    labels.save(str(out), plugin=PLUGIN)

    saved = nib.load(out)
    ijk = np.argwhere(np.asarray(saved.dataobj) == 1)[0]
    scan = load_volume(source)
    assert np.allclose(saved.affine @ np.r_[ijk, 1], scan.affine @ np.r_[60, 30, 70, 1], atol=1e-4)


def test_saving_labels_of_the_wrong_shape_is_refused(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(real_data.nibabel_anatomical(), plugin=PLUGIN)
    labels = viewer.add_labels(np.zeros((3, 3, 3), np.uint8), metadata=dict(image.metadata))
    with pytest.raises(FewLabelError, match="scan's shape"):
        labels.save(str(tmp_path / "m.nii.gz"), plugin=PLUGIN)
    assert list(tmp_path.iterdir()) == []


def test_image_layer_saves_as_nifti(make_napari_viewer, tmp_path):
    source = real_data.nibabel_anatomical()
    viewer = make_napari_viewer()
    (image,) = viewer.open(source, plugin=PLUGIN)
    out = tmp_path / "copy.nii.gz"
    image.save(str(out), plugin=PLUGIN)
    original = nib.load(source)
    saved = nib.load(out)
    assert np.allclose(saved.affine, original.affine, atol=1e-4)
    assert np.array_equal(np.asarray(saved.dataobj), np.asarray(original.dataobj))


def test_a_mask_from_another_tool_opens_as_labels_on_its_scan(make_napari_viewer):
    viewer = make_napari_viewer()
    (image,) = viewer.open(real_data.lung1_image(), plugin=PLUGIN)
    (mask,) = viewer.open(real_data.lung1_label(), plugin=PLUGIN)
    assert image._type_string == "image" and mask._type_string == "labels"
    assert mask.data.shape == image.data.shape
    np.testing.assert_allclose(mask.scale, image.scale)
    np.testing.assert_allclose(mask.translate, image.translate)
    assert np.asarray(mask.data).any()


def test_file_save_keeps_the_marks_and_classes_for_the_next_open(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(real_data.nibabel_anatomical(), plugin=PLUGIN)
    classes = [
        {"index": 0, "name": "background", "color": [0, 0, 0]},
        {"index": 1, "name": "ventricle", "color": [0, 130, 200]},
    ]
    metadata = {
        **image.metadata,
        "fewlabel_classes": classes,
        "fewlabel_empty_slices": {"axis": 0, "slices": [2, 5]},
    }
    labels = viewer.add_labels(
        np.zeros(image.data.shape, np.uint8),
        scale=image.scale,
        translate=image.translate,
        metadata=metadata,
    )
    labels.data[10, 20:24, 20:24] = 1
    out = tmp_path / "mask.nii.gz"
    labels.save(str(out), plugin=PLUGIN)

    (reopened,) = viewer.open(out, plugin=PLUGIN)
    assert reopened._type_string == "labels"
    assert reopened.metadata["fewlabel_empty_slices"] == {"axis": 0, "slices": [2, 5]}
    assert reopened.metadata["fewlabel_classes"] == classes
    assert tuple(reopened.colormap.map(1)[:3]) == pytest.approx((0, 130 / 255, 200 / 255))


def test_a_big_endian_mask_opens_as_native_labels(make_napari_viewer, tmp_path):
    mask = np.zeros((6, 8, 8), ">i2")
    mask[2, 2:5, 2:5] = 3
    path = tmp_path / "old_tool_mask.nii"
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 1.0, 1.0, 1.0]), header=header), path)
    assert nib.load(path).get_data_dtype().byteorder == ">"
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer._type_string == "labels"
    assert layer.data.dtype.isnative
    assert int(np.asarray(layer.data).max()) == 3


def test_a_float_mask_declared_as_labels_opens_as_integer_labels(make_napari_viewer, tmp_path):
    data = np.zeros((6, 8, 8), np.float32)
    data[2, 2:5, 2:5] = 2.0
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "float_mask.nii.gz")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "float_mask.nii.gz", plugin=PLUGIN)
    assert layer._type_string == "labels"
    assert layer.data.dtype == np.uint8
    assert int(np.asarray(layer.data).max()) == 2
