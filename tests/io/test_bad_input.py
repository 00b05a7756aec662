"""Bad files and bad exports: one documented exception, a sentence, nothing half-written."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import real_data
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import Volume, load_volume, save_labels


def _nifti(tmp_path: Path, data: np.ndarray, name: str = "x.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nrrd", "empty.mha", "empty.nii"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(FewLabelError, match="empty"):
        load_volume(tmp_path / name)


def test_truncated_gzip_nifti(tmp_path):
    good = _nifti(tmp_path, np.zeros((20, 20, 20), np.int16))
    data = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FewLabelError, match="truncated"):
        load_volume(bad)


def test_truncated_nrrd(tmp_path):
    src = real_data.lung1_image()
    bad = tmp_path / "lung1.nrrd"
    bad.write_bytes(src.read_bytes()[:200_000])
    with pytest.raises(FewLabelError, match="truncated"):
        load_volume(bad)


def test_mhd_pointing_to_missing_raw(tmp_path):
    image = sitk.ReadImage(str(real_data.nibabel_anatomical()))
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(image, str(path))
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(FewLabelError, match="missing data file"):
        load_volume(path)


def test_not_a_nifti_at_all(tmp_path):
    path = tmp_path / "photo.nii.gz"
    path.write_bytes(gzip.compress(b"this is a holiday photo, not a scan" * 20))
    with pytest.raises(FewLabelError, match="not NIfTI"):
        load_volume(path)


def test_2d_image(tmp_path):
    with pytest.raises(FewLabelError, match="3D scan is needed"):
        load_volume(_nifti(tmp_path, np.zeros((30, 30), np.int16)))


def test_4d_image(tmp_path):
    with pytest.raises(FewLabelError, match=r"4D.*Extract one 3D volume"):
        load_volume(_nifti(tmp_path, np.zeros((10, 10, 10, 3), np.int16)))


def test_4d_with_one_time_point_is_accepted(tmp_path):
    assert load_volume(_nifti(tmp_path, np.zeros((10, 11, 12, 1), np.int16))).shape == (12, 11, 10)


def test_rgb_image(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(FewLabelError, match="components per voxel"):
        load_volume(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(b"II*\x00")
    with pytest.raises(FewLabelError, match="unsupported file type"):
        load_volume(path)


def test_missing_path(tmp_path):
    with pytest.raises(FewLabelError, match="No file or folder"):
        load_volume(tmp_path / "nope.nii.gz")


# ----------------------------------------------------------------- exports
@pytest.fixture
def scan() -> Volume:
    return load_volume(real_data.nibabel_anatomical())


def test_export_with_wrong_shape(scan, tmp_path):
    with pytest.raises(FewLabelError, match="drawn on this scan"):
        save_labels(np.zeros((3, 3, 3), np.uint8), like=scan, path=tmp_path / "m.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "dtype", "match"),
    [
        (0.5, np.float32, "fractional"),
        (-1, np.int32, "negative"),
        (np.nan, np.float64, "fractional"),
    ],
)
def test_export_with_invalid_label_values(scan, tmp_path, value, dtype, match):
    mask = np.zeros(scan.shape, dtype)
    mask[0, 0, 0] = value
    with pytest.raises(FewLabelError, match=match):
        save_labels(mask, like=scan, path=tmp_path / "m.nii.gz")


def test_export_to_wrong_suffix(scan, tmp_path):
    with pytest.raises(FewLabelError, match=r"\.nii\.gz"):
        save_labels(np.zeros(scan.shape, np.uint8), like=scan, path=tmp_path / "m.png")


def test_export_to_missing_folder(scan, tmp_path):
    with pytest.raises(FewLabelError, match="does not exist"):
        save_labels(np.zeros(scan.shape, np.uint8), like=scan, path=tmp_path / "no/m.nii.gz")


def test_export_to_unwritable_place(scan):
    with pytest.raises(FewLabelError, match="Cannot write"):
        save_labels(np.zeros(scan.shape, np.uint8), like=scan, path="/proc/m.nii.gz")


def test_failed_export_leaves_the_old_file_and_no_temp(scan, tmp_path, monkeypatch):
    """A write that dies half way (disk full) must not clobber the previous mask."""
    target = tmp_path / "mask.nii.gz"
    save_labels(np.ones(scan.shape, np.uint8), like=scan, path=target)
    before = target.read_bytes()

    def die_half_way(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", die_half_way)
    with pytest.raises(FewLabelError, match="No space left"):
        save_labels(np.zeros(scan.shape, np.uint8), like=scan, path=target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


# ---------------------------------------------------- fuzzing every reader
def _seed_files(tmp: Path) -> dict[str, bytes]:
    image = sitk.ReadImage(str(real_data.nibabel_anatomical()))
    files = {}
    for suffix in (".nii", ".nii.gz", ".nrrd", ".mha"):
        path = tmp / f"seed{suffix}"
        if suffix.startswith(".nii"):
            shutil.copy(real_data.nibabel_anatomical(), tmp / "seed.nii")
            if suffix == ".nii.gz":
                path.write_bytes(gzip.compress((tmp / "seed.nii").read_bytes()))
        else:
            sitk.WriteImage(image, str(path), useCompression=suffix == ".nrrd")
        files[suffix] = path.read_bytes()
    files[".dcm"] = next(
        (real_data.pydicom_tests() / "dicomdirtests/98892001/CT5N").iterdir()
    ).read_bytes()
    return files


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory) -> dict[str, bytes]:
    return _seed_files(tmp_path_factory.mktemp("seeds"))


@st.composite
def corruptions(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "header"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[at:])
    # flip a few bytes, anywhere or within the header where parsers are most fragile
    limit = min(len(data), 600) if kind == "header" else len(data)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, limit - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".dcm"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_corrupted_bytes_raise_only_fewlabelerror(suffix, seed_files, data):
    payload = data.draw(corruptions(seed_files[suffix]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"scan{suffix}"
        path.write_bytes(payload)
        try:
            volume = load_volume(path)
        except FewLabelError as exc:
            assert str(exc)  # a sentence, never an empty message
        else:
            assert volume.array.ndim == 3


def test_saved_files_get_ordinary_permissions(scan, tmp_path):
    import os
    import stat

    out = save_labels(np.zeros(scan.shape, np.uint8), like=scan, path=tmp_path / "m.nii.gz")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
