"""Augmentation of 2D slice batches, in torch, on whatever device trains.

Geometry (small rotation, scaling, translation, optional flips) is drawn once
per sample and applied to images and labels together through one
``affine_grid``/``grid_sample`` call, so a CPU step spends its time in the
network, not here. Intensity jitter changes contrast, brightness and noise of
the normalised images only.

For the consistency term a *weak* view (geometry + light jitter) and a
*strong* view (the same geometry + heavy jitter, blur and a cut-out box) of
the same slices are made: pseudo-labels come from the weak view and supervise
the strong one (FixMatch's pairing).

Flips are off by default: many label sets have a side (left/right lung, LV/RV,
left/right kidney) and a flipped slice teaches the network that the sides can
swap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (images are normalised, so intensities are in z-score-ish units).

    Attributes
    ----------
    rotate_deg : float
        Maximum in-plane rotation, degrees (uniform in +-).
    scale : tuple of float
        Range of isotropic zoom factors.
    translate : float
        Maximum shift as a fraction of the slice size.
    flips : bool
        Random left-right and up-down flips (see module docstring).
    contrast : float
        Maximum relative contrast change of the weak view (x in 1 +- contrast).
    brightness : float
        Maximum additive shift of the weak view.
    noise_std : float
        Maximum Gaussian noise of the weak view.
    strong_contrast, strong_brightness, strong_noise_std : float
        The same for the strong view.
    strong_blur_sigma : float
        Maximum Gaussian blur (pixels) of the strong view.
    strong_cutout : float
        Side of the cut-out box as a fraction of the slice (0 disables it).
    """

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.06
    flips: bool = False
    contrast: float = 0.15
    brightness: float = 0.1
    noise_std: float = 0.05
    strong_contrast: float = 0.4
    strong_brightness: float = 0.3
    strong_noise_std: float = 0.15
    strong_blur_sigma: float = 1.0
    strong_cutout: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        kwargs = dict(d)
        if "scale" in kwargs:
            kwargs["scale"] = (float(kwargs["scale"][0]), float(kwargs["scale"][1]))
        return cls(**kwargs)


def random_geometry(
    batch: int, config: AugmentConfig, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Random affine matrices ``(B, 2, 3)`` for ``F.affine_grid`` (normalised coordinates)."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    angle = uniform(-config.rotate_deg, config.rotate_deg) * (math.pi / 180)
    zoom = uniform(*config.scale)
    shift = (
        uniform(-config.translate, config.translate),
        uniform(-config.translate, config.translate),
    )
    flip_x = torch.ones(batch)
    flip_y = torch.ones(batch)
    if config.flips:
        flip_x = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_y, 2 * shift[0]], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, 2 * shift[1]], dim=1),
        ],
        dim=1,
    )
    return theta.to(device)


def warp(
    images: torch.Tensor, labels: torch.Tensor | None, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply affine matrices to images ``(B, C, H, W)`` and labels ``(B, H, W)``.

    Images are resampled bilinearly, labels by nearest neighbour; both repeat
    their border outside the slice (the border of a padded slice is background).
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    warped_labels = None
    if labels is not None:
        warped_labels = (
            F.grid_sample(
                labels[:, None].to(images.dtype),
                grid,
                mode="nearest",
                padding_mode="border",
                align_corners=False,
            )[:, 0]
            .round()
            .to(labels.dtype)
        )
    return warped, warped_labels


def jitter_intensity(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    contrast: float,
    brightness: float,
    noise_std: float,
) -> torch.Tensor:
    """Random contrast (about each sample's mean), brightness and Gaussian noise."""
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    gain = 1 + contrast * (2 * torch.rand(shape, generator=generator) - 1)
    shift = brightness * (2 * torch.rand(shape, generator=generator) - 1)
    sigma = noise_std * torch.rand(shape, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    device = images.device
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (
        (images - mean) * gain.to(device)
        + mean
        + shift.to(device)
        + sigma.to(device) * noise.to(device)
    )


def strong_view(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Heavy intensity jitter, a random blur and a cut-out box (same geometry as the input)."""
    out = jitter_intensity(
        images,
        generator,
        contrast=config.strong_contrast,
        brightness=config.strong_brightness,
        noise_std=config.strong_noise_std,
    )
    if config.strong_blur_sigma > 0:
        sigma = float(config.strong_blur_sigma * torch.rand(1, generator=generator))
        if sigma > 0.3:
            out = _gaussian_blur(out, sigma)
    if config.strong_cutout > 0:
        out = _cutout(out, config.strong_cutout, generator)
    return out


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="replicate"),
        kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="replicate"),
        kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
        groups=c,
    )


def _cutout(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    bh, bw = max(1, int(h * fraction)), max(1, int(w * fraction))
    top = torch.randint(0, h - bh + 1, (b,), generator=generator)
    left = torch.randint(0, w - bw + 1, (b,), generator=generator)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    box = (
        (rows >= top[:, None, None])
        & (rows < (top + bh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + bw)[:, None, None])
    )
    fill = images.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(box[:, None].to(images.device), fill, images)
