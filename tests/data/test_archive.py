from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import real_data
from napari_fewlabel.data import archive as archive_module
from napari_fewlabel.data.archive import (
    EpochIndices,
    SliceArchive,
    SliceBlocks,
    find_scans,
    read_scan_header,
)
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume


def _nifti(path: Path, array: np.ndarray, zooms=(1.0, 1.0, 1.0), affine=None) -> Path:
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _head(shape=(24, 20, 16), seed=0) -> np.ndarray:
    """A bright ellipsoid with texture on a dark background (int16, MR-like)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = zz**2 + yy**2 + xx**2 < 0.8
    return (inside * (500 + 100 * rng.standard_normal(shape))).astype(np.int16)


def test_nifti_and_nrrd_are_indexed_from_their_headers_alone(tmp_path, monkeypatch):
    oblique = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -4], [0, 3.0, 0, 7], [0, 0, 0, 1]])
    files = [
        _nifti(tmp_path / "a.nii.gz", _head()),
        _nifti(tmp_path / "b.nii", _head((10, 30, 12)), affine=oblique),
    ]
    image = sitk.GetImageFromArray(_head((8, 12, 14)))
    image.SetSpacing((0.5, 0.7, 2.5))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(image, str(tmp_path / "c.nrrd"))
    files.append(tmp_path / "c.nrrd")
    expected = {p: load_volume(p) for p in files}

    def no_loading(path):
        raise AssertionError(f"indexing loaded {path}")

    monkeypatch.setattr(archive_module, "load_volume", no_loading)
    for path in files:
        scan = read_scan_header(path)
        assert scan.shape == expected[path].shape
        assert scan.spacing_mm == pytest.approx(expected[path].spacing_mm)


def test_real_scans_headers_match_the_loaded_volumes():
    for path in (real_data.itk_t1(), real_data.lung1_image()):
        scan, volume = read_scan_header(path), load_volume(path)
        assert scan.shape == volume.shape
        assert scan.spacing_mm == pytest.approx(volume.spacing_mm)


def test_folders_are_searched_and_a_dicom_folder_is_one_scan(tmp_path):
    pytest.importorskip("pydicom")
    from dicom_writer import write_ct_series

    hu = np.full((6, 16, 16), -1000, dtype=np.int16)
    hu[:, 4:12, 4:12] = 40
    write_ct_series(
        tmp_path / "study" / "ct",
        hu,
        first_position=np.zeros(3),
        pixel_spacing=(1.0, 1.0),
        slice_step_mm=1.0,
    )
    _nifti(tmp_path / "study" / "mr.nii.gz", _head())
    (tmp_path / "study" / "notes.txt").write_text("not a scan")
    found = find_scans([tmp_path / "study"])
    assert sorted(found) == [tmp_path / "study" / "ct", tmp_path / "study" / "mr.nii.gz"]
    archive = SliceArchive([tmp_path / "study" / "ct"], slice_size=32, min_side=4)
    assert archive.scans[0].shape == (6, 16, 16)
    window, _ = archive.window(0, 0, 3)
    assert window.shape == (3, 32, 32)
    assert archive.modalities() == {str(tmp_path / "study" / "ct"): "CT"}


def test_missing_paths_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(FewLabelError, match="No file or folder"):
        find_scans([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewLabelError, match="No scans found"):
        find_scans([tmp_path / "empty"])


def test_memory_stays_bounded_over_many_scans(tmp_path):
    paths = [_nifti(tmp_path / f"s{i:02d}.nii.gz", _head(seed=i)) for i in range(40)]
    archive = SliceArchive(paths, slice_size=32, cache_scans=2)
    blocks = SliceBlocks(archive, block_size=2)
    one_scan = archive.scans[0].nbytes_estimate
    seen = set()
    for item in range(len(blocks)):
        blocks[item]
        seen.add(int(blocks.owner[item]))
        assert archive.cached_scans <= 2
        assert archive.cached_bytes <= 2 * one_scan
    assert seen == set(range(40))
    assert archive.loads >= 40


def test_megabyte_limit_keeps_at_least_one_scan(tmp_path):
    paths = [_nifti(tmp_path / f"s{i}.nii.gz", _head(seed=i)) for i in range(3)]
    archive = SliceArchive(paths, slice_size=32, cache_scans=10, cache_mb=0.001)
    for scan in range(3):
        archive.window(scan, 0, 5)
        assert archive.cached_scans == 1


def test_anisotropic_slices_are_skipped(tmp_path):
    thick = _nifti(tmp_path / "thick.nii.gz", _head((20, 20, 10)), zooms=(0.8, 0.8, 6.5))
    archive = SliceArchive([thick], slice_size=32)
    # The file's third axis (6.5 mm) is the display z axis: only axial slices are square-ish.
    assert archive.scans[0].spacing_mm == pytest.approx((6.5, 0.8, 0.8))
    assert archive.axes == [[0]]
    assert len(archive) == 10


def test_a_window_holds_adjacent_slices_normalised_and_fitted(tmp_path):
    ramp = np.zeros((12, 8, 16), dtype=np.int16)  # (x, y, z) in the file: z = slice index
    for z in range(16):
        ramp[2:10, 2:6, z] = 100 + 10 * z
    archive = SliceArchive([_nifti(tmp_path / "ramp.nii.gz", ramp)], slice_size=32, min_side=4)
    assert archive.scans[0].shape == (16, 8, 12)
    window, foreground = archive.window(0, 0, 0)
    assert window.shape == (3, 32, 32)
    centre = window[:, 16, 16]
    # Slices -1 (repeated end), 0, 1: the first two equal, the third brighter.
    assert centre[0] == pytest.approx(float(centre[1]))
    assert centre[2] > centre[1]
    # 12 x 8 voxels enlarged to 32 x 21 (longer side 32), the rest padded with background.
    background = window[1, 0, 0]
    assert torch.all(window[:, :5] == background) and torch.all(window[:, -5:] == background)
    assert 0.2 < foreground < 0.5


def test_blocks_are_reproducible_per_epoch_and_change_between_epochs(tmp_path):
    paths = [_nifti(tmp_path / f"s{i}.nii.gz", _head(seed=i)) for i in range(2)]
    blocks = SliceBlocks(SliceArchive(paths, slice_size=32), block_size=4, seed=3)
    assert torch.equal(blocks[(0, 1)], blocks[(0, 1)])
    assert torch.equal(blocks[1], blocks[(0, 1)])
    assert not torch.equal(blocks[(0, 1)], blocks[(1, 1)])
    assert blocks[(0, 1)].shape == (4, 3, 32, 32)


def test_distributed_sampler_splits_items_between_ranks(tmp_path):
    paths = [_nifti(tmp_path / f"s{i}.nii.gz", _head(seed=i)) for i in range(3)]
    blocks = SliceBlocks(SliceArchive(paths, slice_size=32), block_size=4)
    per_rank = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(
            blocks, num_replicas=2, rank=rank, seed=0, drop_last=True
        )
        indices = EpochIndices(sampler)
        indices.set_epoch(5)
        per_rank.append(list(indices))
    assert all(epoch == 5 for pairs in per_rank for epoch, _ in pairs)
    items = [{item for _, item in pairs} for pairs in per_rank]
    assert not items[0] & items[1]
    assert len(items[0] | items[1]) >= len(blocks) - 1


def test_survey_names_every_scans_modality_without_caching_voxels(tmp_path):
    # What the model card lists, even when data-loading workers did all the loading.
    ct = np.full((24, 20, 16), -1000, dtype=np.int16)
    ct[4:20, 4:16, 2:14] = 40
    paths = [_nifti(tmp_path / "mr.nii.gz", _head()), _nifti(tmp_path / "ct.nii.gz", ct)]
    archive = SliceArchive(paths, slice_size=32)
    assert archive.modalities() == {}
    surveyed = archive.survey()
    assert surveyed == {str(paths[0]): load_volume(paths[0]).modality, str(paths[1]): "CT"}
    assert surveyed[str(paths[0])] != "CT"
    assert archive.cached_scans == 0
    assert [d["modality"] for d in archive.describe()] == [surveyed[str(p)] for p in paths]
