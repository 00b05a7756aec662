from __future__ import annotations

import pytest
import torch

from napari_fewlabel.data.views import ViewConfig, make_view_pair
from napari_fewlabel.losses.dense_contrastive import sample_dense


def _smooth_slices(batch: int, h: int, w: int) -> torch.Tensor:
    """Two smooth channels: bilinear resampling of them is almost exact."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    image = torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(4 * yy - xx)])
    return image[None].repeat(batch, 1, 1, 1)


@pytest.mark.parametrize(
    ("source_hw", "view_hw"), [((96, 160), (64, 80)), ((128, 128), (32, 32)), ((70, 50), (48, 48))]
)
def test_corresponding_locations_show_the_same_point_of_the_slice(source_hw, view_hw):
    generator = torch.Generator().manual_seed(0)
    slices = _smooth_slices(6, *source_hw)
    pair = make_view_pair(slices, ViewConfig(size=view_hw), generator, jitter=False)
    in_first, in_second, valid = pair.corresponding_points(128, generator)
    first = sample_dense(pair.first, in_first)
    second = sample_dense(pair.second, in_second)
    source = sample_dense(slices, pair.source_points(in_first))
    assert valid.float().mean() > 0.5
    assert (first - second)[valid].abs().max() < 0.02  # equal up to interpolation
    assert (first - source)[valid].abs().max() < 0.02
    shuffled = second[:, torch.randperm(128, generator=generator)]
    assert (first - shuffled)[valid].abs().mean() > 0.2


def test_locations_marked_invalid_fall_outside_the_second_view():
    generator = torch.Generator().manual_seed(1)
    config = ViewConfig(size=(32, 32), crop_scale=(0.3, 0.4), max_offset=0.5)
    pair = make_view_pair(_smooth_slices(8, 64, 64), config, generator, jitter=False)
    in_first, in_second, valid = pair.corresponding_points(64, generator)
    outside = (in_second.abs() > 1 - 1 / 32).any(dim=-1)
    assert (~valid).any()
    assert torch.equal(~valid, outside)
    assert (in_first.abs() <= 1).all()


def test_same_geometry_and_no_jitter_gives_identical_views_jitter_makes_them_differ():
    still = ViewConfig(
        size=(32, 32), crop_scale=(1.0, 1.0), max_offset=0.0, rotate_deg=0.0, flips=False
    )
    slices = _smooth_slices(4, 32, 32)
    plain = make_view_pair(slices, still, torch.Generator().manual_seed(2), jitter=False)
    assert torch.allclose(plain.first, plain.second)
    assert torch.allclose(plain.first, slices, atol=1e-5)
    jittered = make_view_pair(slices, still, torch.Generator().manual_seed(2))
    # Contrast, brightness and noise are drawn for each view on its own.
    assert (jittered.first - jittered.second).abs().mean() > 0.01
    assert not torch.allclose(
        jittered.first.mean(dim=(1, 2, 3)), jittered.second.mean(dim=(1, 2, 3))
    )


def test_views_have_the_configured_size_and_all_channels_share_the_geometry():
    slices = _smooth_slices(3, 64, 64)
    slices[:, 1] = slices[:, 0]  # two identical channels must stay identical
    pair = make_view_pair(slices, ViewConfig(size=(24, 40)), torch.Generator(), jitter=False)
    assert pair.first.shape == pair.second.shape == (3, 2, 24, 40)
    assert torch.allclose(pair.first[:, 0], pair.first[:, 1])


def test_rejects_an_empty_crop_range():
    with pytest.raises(ValueError, match="crop_scale"):
        ViewConfig(crop_scale=(0.0, 1.0))
