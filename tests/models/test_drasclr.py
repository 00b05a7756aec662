"""CondConv3D and the DrasCLR encoder: location-dependent kernels, shapes, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.condconv3d import CondConv3d
from napari_fewlabel.models.drasclr import DrasCLRConfig, DrasCLREncoder, SubtypeClassifier


def test_condconv_equals_the_routed_sum_of_expert_convolutions():
    torch.manual_seed(0)
    conv = CondConv3d(2, 3, 3, stride=2, padding=1, experts=4)
    x = torch.randn(3, 2, 9, 9, 9)
    locations = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.5, -0.5], [1.0, 1.0, 1.0]])
    out = conv(x, locations)
    assert out.shape == (3, 3, 5, 5, 5)
    for i in range(3):
        r = torch.sigmoid(conv.router(locations[i]))
        expected = sum(
            r[k] * F.conv3d(x[i : i + 1], conv.weight[k], conv.bias[k], stride=2, padding=1)
            for k in range(4)
        )
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", [2, 4])  # 1 output voxel: experts' outputs mixed; 8: kernels
def test_both_ways_of_mixing_give_the_routed_sum(side):
    torch.manual_seed(1)
    conv = CondConv3d(3, 5, 3, stride=2, padding=1, experts=4)
    x = torch.randn(6, 3, side, side, side)
    locations = torch.rand(6, 3) * 2 - 1
    r = torch.sigmoid(conv.router(locations))
    expected = torch.stack(
        [
            sum(
                r[i, k] * F.conv3d(x[i : i + 1], conv.weight[k], conv.bias[k], stride=2, padding=1)
                for k in range(4)
            )[0]
            for i in range(6)
        ]
    )
    torch.testing.assert_close(conv(x, locations), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        conv._mix_outputs(x, locations), conv._mix_kernels(x, locations), rtol=1e-4, atol=1e-5
    )


def test_the_same_patch_at_another_location_gives_another_output():
    torch.manual_seed(0)
    conv = CondConv3d(1, 4, 3, padding=1, experts=8)
    patch = torch.randn(1, 1, 6, 6, 6).expand(2, -1, -1, -1, -1)
    here_and_there = torch.tensor([[-0.8, 0.2, 0.5], [0.7, -0.6, -0.3]])
    out = conv(patch, here_and_there)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    weights, _ = conv.kernels(here_and_there)
    assert not torch.allclose(weights[0], weights[1])
    # ... and the same location gives the same output.
    same = conv(patch, here_and_there[:1].expand(2, -1))
    torch.testing.assert_close(same[0], same[1])


def test_encoder_maps_patches_and_locations_to_features_and_learns_its_router():
    torch.manual_seed(0)
    config = DrasCLRConfig(widths=(4, 4, 8, 8, 16), experts=2, patch_size=16)
    encoder = DrasCLREncoder(config)
    patches = torch.randn(3, 1, 16, 16, 16)
    locations = torch.rand(3, 3) * 2 - 1
    features = encoder(patches, locations)
    assert features.shape == (3, 16)
    features.pow(2).sum().backward()
    routers = [m.router.weight.grad for m in encoder.modules() if isinstance(m, CondConv3d)]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)
    with pytest.raises(ValueError, match="locations"):
        encoder(patches, locations[:, :2])


def test_paper_architecture_and_config_round_trip():
    config = DrasCLRConfig()
    assert config.widths == (8, 8, 16, 32, 64, 128) and config.experts == 8
    assert DrasCLRConfig.from_dict(config.to_dict()) == config
    classifier = SubtypeClassifier(DrasCLRConfig(widths=(4, 4, 8, 16), patch_size=8), 4)
    assert classifier(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 3)).shape == (2, 4)
    with pytest.raises(FewLabelError, match="not a DrasCLR encoder"):
        DrasCLRConfig.from_dict({"name": "unet2d"})
