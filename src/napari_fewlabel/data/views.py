"""Two augmented views of a slice whose pixels correspond through a known geometry.

Dense contrastive pretraining needs, for a location ``u`` in view 1, the
location ``v`` in view 2 that shows the same point of the slice. Each view is
a random crop (scale, position), rotation and flip of the source slice,
resampled to a fixed size with one affine ``grid_sample``; the affine maps
from view coordinates to source coordinates are kept, so

    source = A1 u + t1 = A2 v + t2   =>   v = A2^-1 (A1 u + t1 - t2).

Coordinates are normalised as in :func:`torch.nn.functional.grid_sample`
with ``align_corners=False``: ``(x, y)`` in ``[-1, 1]``, -1 and 1 being the
outer edges of the border pixels. The maps are built in pixel units and only
then normalised, so rotations stay rotations on non-square slices and views.

Intensity jitter (contrast, brightness, noise) is drawn independently for
each view: the network must match anatomy, not grey values. The two crops'
centres are kept within ``max_offset`` of each other so the views overlap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from napari_fewlabel.data.augment import jitter_intensity


@dataclass(frozen=True)
class ViewConfig:
    """How the two views of a slice are made.

    Attributes
    ----------
    size : tuple of int
        ``(h, w)`` of each view in pixels.
    crop_scale : tuple of float
        Range of the crop's side as a fraction of the slice's shorter side
        (1 = the whole slice, smaller = zoomed in).
    max_offset : float
        Largest distance between the two crops' centres, as a fraction of the
        slice (per axis); small values make the views overlap more.
    rotate_deg : float
        Maximum rotation of each view, degrees.
    flips : bool
        Random left-right and up-down flips of each view (side does not
        matter for pretraining features, unlike for labels).
    contrast, brightness, noise_std : float
        Intensity jitter of each view (see :func:`~napari_fewlabel.data.augment.jitter_intensity`).
    """

    size: tuple[int, int] = (128, 128)
    crop_scale: tuple[float, float] = (0.4, 1.0)
    max_offset: float = 0.25
    rotate_deg: float = 20.0
    flips: bool = True
    contrast: float = 0.3
    brightness: float = 0.2
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi:
            raise ValueError(f"crop_scale must be 0 < low <= high, got {self.crop_scale}")
        if min(self.size) < 1:
            raise ValueError(f"view size must be positive, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViewConfig:
        kwargs = dict(d)
        for key in ("size", "crop_scale"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class ViewPair:
    """Two views of a batch of slices and the maps from view to source coordinates.

    Attributes
    ----------
    first, second : Tensor, shape (B, C, h, w)
        The views (intensity-jittered independently).
    first_to_source, second_to_source : Tensor, shape (B, 2, 3)
        Affine maps ``[A | t]`` from a view's normalised ``(x, y)`` to the
        source slice's normalised ``(x, y)``.
    """

    first: torch.Tensor
    second: torch.Tensor
    first_to_source: torch.Tensor
    second_to_source: torch.Tensor

    def first_to_second(self, points: torch.Tensor) -> torch.Tensor:
        """Map ``(B, N, 2)`` locations of view 1 to the same anatomy in view 2."""
        source = _apply(self.first_to_source, points)
        a2, t2 = self.second_to_source[:, :, :2], self.second_to_source[:, :, 2]
        return torch.linalg.solve(a2, (source - t2[:, None, :]).transpose(1, 2)).transpose(1, 2)

    def source_points(self, points: torch.Tensor) -> torch.Tensor:
        """Locations ``(B, N, 2)`` of view 1 in the source slice's coordinates."""
        return _apply(self.first_to_source, points)

    def corresponding_points(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random locations per slice, preferring ones visible in both views.

        Parameters
        ----------
        n : int
            Locations per slice.
        generator : torch.Generator

        Returns
        -------
        in_first, in_second : Tensor, shape (B, n, 2)
            Normalised ``(x, y)`` in view 1 and the corresponding location in view 2.
        valid : Tensor, shape (B, n), bool
            True where the location lies inside both views (with little
            overlap a few may not; leave those out of the loss).
            Locations of view 1 always lie inside view 1.
        """
        b = self.first.shape[0]
        candidates = 4 * n
        # Stay between the outermost pixel centres of both views, where bilinear
        # sampling needs no padding.
        h, w = self.first.shape[-2:]
        margin = torch.tensor([1 - 1 / w, 1 - 1 / h])
        first = (2 * torch.rand(b, candidates, 2, generator=generator) - 1) * margin
        first = first.to(self.first_to_source.device, self.first_to_source.dtype)
        second = self.first_to_second(first)
        inside = (second.abs() <= margin.to(second)).all(dim=-1)
        # Random order, valid candidates first: the top n by this score.
        score = torch.rand(b, candidates, generator=generator).to(inside.device) + 2 * inside
        pick = score.topk(n, dim=1).indices
        gather = pick[:, :, None].expand(b, n, 2)
        return first.gather(1, gather), second.gather(1, gather), inside.gather(1, pick)


def _apply(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]


def _random_view_maps(
    batch: int,
    source_hw: tuple[int, int],
    config: ViewConfig,
    generator: torch.Generator,
    centres: torch.Tensor | None,
) -> torch.Tensor:
    """Affine maps ``(B, 2, 3)`` from view to source normalised coordinates."""
    (hs, ws), (hv, wv) = source_hw, config.size

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, *shape, generator=generator)

    scale = uniform(*config.crop_scale)
    crop_px = scale * min(hs, ws)  # side of the crop in source pixels
    zoom = crop_px / max(hv, wv)  # source pixels per view pixel
    angle = uniform(-config.rotate_deg, config.rotate_deg) * (math.pi / 180)
    flip = torch.ones(batch, 2)
    if config.flips:
        flip = torch.where(torch.rand(batch, 2, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    # Pixel-space linear map: source_px = zoom * R * diag(flip) * view_px (about the centres).
    linear_px = zoom[:, None, None] * rotation * flip[:, None, :]
    to_view_px = torch.tensor([wv / 2, hv / 2])
    from_source_px = torch.tensor([2 / ws, 2 / hs])
    linear = from_source_px[None, :, None] * linear_px * to_view_px[None, None, :]
    if centres is None:
        # Keep an unrotated crop inside the slice: its centre within (1 - crop/side).
        room = torch.stack([1 - crop_px / ws, 1 - crop_px / hs], dim=1).clamp(min=0)
        centres = (2 * torch.rand(batch, 2, generator=generator) - 1) * room
    return torch.cat([linear, centres[:, :, None]], dim=2)


def make_view_pair(
    slices: torch.Tensor,
    config: ViewConfig,
    generator: torch.Generator,
    *,
    jitter: bool = True,
) -> ViewPair:
    """Two augmented views of each slice with known correspondence.

    Parameters
    ----------
    slices : Tensor, shape (B, C, H, W)
        Normalised slices (``C`` adjacent slices as channels get the same geometry).
    config : ViewConfig
    generator : torch.Generator
        Source of randomness (CPU), for reproducible views.
    jitter : bool
        Apply intensity jitter (off to check the geometry alone).

    Returns
    -------
    ViewPair
    """
    b, c, h, w = slices.shape
    first_map = _random_view_maps(b, (h, w), config, generator, None)
    offset = config.max_offset * 2 * (2 * torch.rand(b, 2, generator=generator) - 1)
    second_centres = (first_map[:, :, 2] + offset).clamp(-1, 1)
    second_map = _random_view_maps(b, (h, w), config, generator, second_centres)
    views = []
    for theta in (first_map, second_map):
        theta = theta.to(slices.device, slices.dtype)
        grid = F.affine_grid(theta, [b, c, *config.size], align_corners=False)
        view = F.grid_sample(
            slices, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        if jitter:
            view = jitter_intensity(
                view,
                generator,
                contrast=config.contrast,
                brightness=config.brightness,
                noise_std=config.noise_std,
            )
        views.append(view)
    return ViewPair(
        views[0],
        views[1],
        first_map.to(slices.device, slices.dtype),
        second_map.to(slices.device, slices.dtype),
    )
