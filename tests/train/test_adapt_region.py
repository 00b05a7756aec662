"""The critic's region (train.adapt_region): boxes around the anatomy, crops of every level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.slice_stack import SliceStack
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.critic import resize_to
from napari_fewlabel.train.adapt_region import (
    WHOLE,
    CriticRegion,
    box_foreground,
    crop_maps,
    labelled_foreground,
    parse_box,
    region_of,
)


def test_the_region_is_the_foreground_box_grown_by_the_margin():
    mask = torch.zeros(10, 64, 64, dtype=torch.bool)
    mask[3:6, 10:20, 20:30] = True
    region = region_of(mask, margin=0.1)
    assert region is not None
    # Slices 3..5 grow by one each side; rows and columns by two pixels (the minimum).
    assert (region.first, region.last) == (2, 6)
    assert region.box == pytest.approx((8 / 64, 18 / 64, 22 / 64, 32 / 64))


def test_the_box_grows_to_the_input_aspect_and_stays_inside_it():
    mask = torch.zeros(4, 32, 64, dtype=torch.bool)  # input twice as wide as high
    mask[:, 0:2, 0:40] = True  # a flat strip along the top edge
    region = region_of(mask, margin=0.0)
    assert region is not None
    top, left, bottom, right = region.box
    assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
    height, width = (bottom - top) * 32, (right - left) * 64
    assert width / height == pytest.approx(2.0, rel=0.1)
    assert top == 0.0 and right * 64 >= 42  # still holds the strip (plus the 2-pixel minimum)


def test_trim_leaves_out_stray_voxels_far_from_the_anatomy():
    mask = torch.zeros(10, 64, 64, dtype=torch.bool)
    mask[3:7, 20:40, 20:40] = True  # 1600 voxels of anatomy
    mask[9, 63, 63] = True  # one stray voxel in the corner
    stretched, trimmed = region_of(mask, 0.0), region_of(mask, 0.0, trim=0.02)
    assert stretched is not None and trimmed is not None
    assert stretched.last == 9 and stretched.box[2] == 1.0
    assert (trimmed.first, trimmed.last) == (2, 7)  # 3..6 and the one-slice minimum
    assert trimmed.box == pytest.approx((18 / 64, 18 / 64, 42 / 64, 42 / 64))


def test_no_foreground_gives_no_region():
    assert region_of(torch.zeros(3, 8, 8, dtype=torch.bool)) is None


def test_every_level_is_cut_at_the_same_fractions():
    box = (0.25, 0.5, 0.75, 1.0)
    maps = []
    for side in (64, 32, 16):
        m = torch.zeros(2, 3, side, side)
        m[:, :, side // 4 : 3 * side // 4, side // 2 :] = 1.0  # ones exactly in the box
        maps.append(m)
    out = crop_maps(maps, [box, WHOLE], (8, 8))
    for level in out:
        assert level.shape == (2, 3, 8, 8)
        assert torch.all(level[0] == 1.0)  # the crop holds the box only
        assert float(level[1].mean()) == pytest.approx(0.25)  # sample 1: the whole slice
    # Whole slices for every sample: the plain resize, unchanged.
    whole = crop_maps(maps, [WHOLE, WHOLE], (8, 8))
    for a, b in zip(whole, resize_to(maps, (8, 8)), strict=True):
        assert torch.equal(a, b)


def _stack(shape: tuple[int, int, int]) -> SliceStack:
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return SliceStack(array, 0, fit_intensity(array, NormalizationConfig()), (32, 32))


def test_a_voxel_box_maps_through_the_input_fit():
    stack = _stack((6, 64, 64))  # shrunk by two to the 32 x 32 input
    mask = box_foreground([(1, 3), (16, 48), (0, 32)], (6, 64, 64), 0, stack)
    assert mask.shape == (6, 32, 32)
    region = region_of(mask, margin=0.0)
    assert region is not None
    assert (region.first, region.last) == (0, 3)  # slices 1..2, grown by the one-slice minimum
    top, left, bottom, right = region.box
    assert top <= 8 / 32 and bottom >= 24 / 32 and left == 0.0 and right >= 16 / 32


@pytest.mark.parametrize(
    ("box", "match"),
    [
        ([(0, 7), (0, 64), (0, 64)], "z range 0:7"),
        ([(2, 2), (0, 64), (0, 64)], "empty or outside"),
        ([(0, 6), (0, 64)], "three ranges"),
    ],
)
def test_a_box_outside_the_scan_is_refused(box, match):
    with pytest.raises(FewLabelError, match=match):
        box_foreground(box, (6, 64, 64), 0, _stack((6, 64, 64)))


def test_labels_on_another_grid_are_refused():
    with pytest.raises(FewLabelError, match="grid"):
        labelled_foreground(np.ones((6, 60, 64)), (6, 64, 64), 0, _stack((6, 64, 64)), "labels")


def test_parse_box_reads_three_ranges_and_says_how_to_write_them():
    assert parse_box("10:60,40:200,30:220") == ((10, 60), (40, 200), (30, 220))
    for bad in ("10:60,40:200", "a:b,1:2,3:4", "1:2:3,4:5,6:7"):
        with pytest.raises(FewLabelError, match="z0:z1,y0:y1,x0:x1"):
            parse_box(bad)


def test_sampled_slices_stay_in_the_region():
    rng = np.random.default_rng(0)
    region = CriticRegion(4, 6)
    assert {region.sample(rng) for _ in range(200)} == {4, 5, 6}
