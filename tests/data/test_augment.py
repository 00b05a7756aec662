from __future__ import annotations

import torch

from napari_fewlabel.data.augment import (
    AugmentConfig,
    jitter_intensity,
    random_geometry,
    strong_view,
    warp,
)

CPU = torch.device("cpu")


def _labels_and_image():
    labels = torch.zeros(4, 64, 64, dtype=torch.int64)
    labels[:, 20:40, 10:30] = 1
    labels[:, 45:55, 40:60] = 2
    image = labels[:, None].float() * 10 + torch.randn(4, 1, 64, 64) * 0.01
    return image, labels


def test_identity_geometry_changes_nothing():
    image, labels = _labels_and_image()
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).repeat(4, 1, 1)
    out, out_labels = warp(image, labels, theta)
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)
    assert torch.equal(out_labels, labels)


def test_images_and_labels_move_together():
    image, labels = _labels_and_image()
    config = AugmentConfig(rotate_deg=30, scale=(0.8, 1.2), translate=0.1, flips=True)
    theta = random_geometry(4, config, torch.Generator().manual_seed(0), CPU)
    out, out_labels = warp(image, labels, theta)
    assert out_labels.dtype == torch.int64
    assert set(out_labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_labels, labels)
    # The image was labels * 10: after the same warp it must still read back as the labels.
    agreement = ((out[:, 0] / 10).round() == out_labels).float().mean()
    assert agreement > 0.97


def test_without_flips_the_geometry_keeps_orientation():
    config = AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, flips=False)
    theta = random_geometry(16, config, torch.Generator().manual_seed(1), CPU)
    torch.testing.assert_close(theta[:, :, :2], torch.eye(2).repeat(16, 1, 1))
    flipped = random_geometry(
        16, AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, flips=True),
        torch.Generator().manual_seed(1), CPU,
    )  # fmt: skip
    assert (flipped[:, 0, 0] < 0).any()


def test_intensity_jitter_and_strong_view_change_values_not_shapes():
    image, _ = _labels_and_image()
    generator = torch.Generator().manual_seed(0)
    weak = jitter_intensity(image, generator, contrast=0.1, brightness=0.1, noise_std=0.05)
    strong = strong_view(image, AugmentConfig(), generator)
    assert weak.shape == strong.shape == image.shape
    weak_change = (weak - image).abs().mean()
    strong_change = (strong - image).abs().mean()
    assert 0 < weak_change < strong_change


def test_config_round_trip():
    config = AugmentConfig(flips=True, scale=(0.9, 1.1))
    assert AugmentConfig.from_dict(config.to_dict()) == config
