"""Display orientation, file-grid round trips and metadata, on every axis orientation."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import Volume

ORIENTATIONS = [
    (perm, flips)
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((1, -1), repeat=3)
]


def _file_affine(perm: tuple[int, ...], flips: tuple[int, ...], spacing=(0.7, 1.3, 2.9)):
    """File axis i points along world axis perm[i] with sign flips[i]."""
    affine = np.zeros((4, 4))
    for axis, (world, sign) in enumerate(zip(perm, flips, strict=True)):
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = (-11.0, 23.5, 7.25)
    affine[3, 3] = 1
    return affine


@pytest.mark.parametrize(("perm", "flips"), ORIENTATIONS)
def test_every_file_orientation_displays_as_spl_and_round_trips(perm, flips):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(4, 5, 6)).astype(np.int16)
    affine = _file_affine(perm, flips)
    vol = Volume.from_file_array(data, affine, modality="MR")

    assert nib.aff2axcodes(vol.affine) == ("S", "P", "L")
    assert np.array_equal(vol.to_file_grid(vol.array), data)
    # The same voxel value sits at the same world point in both grids.
    for zyx in [(0, 0, 0), (1, 2, 3), tuple(s - 1 for s in vol.shape)]:
        world = vol.affine @ np.r_[zyx, 1]
        ijk = np.linalg.solve(affine, world)[:3]
        assert np.allclose(ijk, np.round(ijk), atol=1e-6)
        assert data[tuple(np.round(ijk).astype(int))] == vol.array[zyx]


def test_spacing_follows_display_axes():
    vol = Volume.from_file_array(
        np.zeros((4, 5, 6)), _file_affine((2, 0, 1), (1, 1, 1)), modality="MR"
    )
    # file axis 0 (0.7 mm) runs along S -> display z; axis 1 (1.3 mm) along R -> x; axis 2 along A -> y.
    assert vol.spacing_mm == pytest.approx((0.7, 2.9, 1.3))
    assert vol.shape == (4, 6, 5)


def test_napari_translate_is_lps_origin_for_axis_aligned_scans():
    vol = Volume.from_array(np.zeros((3, 4, 5)), (2.0, 1.0, 0.5), origin_lps_mm=(10, -20, 30))
    assert vol.napari_translate() == pytest.approx((30, -20, 10))
    # napari world = translate + scale * index = LPS coordinates in (S, P, L) order.
    world_ras = vol.affine @ np.array([2, 3, 4, 1.0])
    napari_world = np.array(vol.napari_translate()) + np.array(vol.spacing_mm) * (2, 3, 4)
    assert napari_world == pytest.approx((world_ras[2], -world_ras[1], -world_ras[0]))


def test_metadata_survives_json_and_rebuilds_the_same_geometry():
    affine = _file_affine((1, 2, 0), (-1, 1, -1))
    vol = Volume.from_file_array(
        np.arange(120).reshape(4, 5, 6), affine, modality="CT", header={"format": "test"}
    )
    meta = json.loads(json.dumps({"fewlabel": vol.to_metadata()}))
    again = Volume.from_metadata(vol.array, meta)
    assert np.allclose(again.affine, vol.affine)
    assert again.spacing_mm == vol.spacing_mm
    assert again.modality == "CT"
    assert np.array_equal(again.to_file_grid(again.array), vol.to_file_grid(vol.array))


def test_metadata_without_geometry_is_refused_with_advice():
    with pytest.raises(FewLabelError, match="napari-fewlabel reader"):
        Volume.from_metadata(np.zeros((2, 2, 2)), {"something": 1})


@pytest.mark.parametrize("shape", [(5, 5), (2, 3, 4, 5)])
def test_non_3d_arrays_are_refused(shape):
    with pytest.raises(FewLabelError, match="3D"):
        Volume.from_array(np.zeros(shape))


def test_with_array_checks_shape():
    vol = Volume.from_array(np.zeros((3, 4, 5)))
    assert vol.with_array(np.ones((3, 4, 5), np.uint8)).array.dtype == np.uint8
    with pytest.raises(FewLabelError, match="same size"):
        vol.with_array(np.zeros((3, 4, 6)))


def test_singular_affine_is_refused():
    affine = np.eye(4)
    affine[2, 2] = 0
    with pytest.raises(FewLabelError, match="singular"):
        Volume.from_file_array(np.zeros((2, 2, 2)), affine, modality="MR")
