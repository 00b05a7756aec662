"""Fit slices to a model's input size and map predictions back.

A slice of shape ``(h, w)`` is shrunk (never enlarged, aspect ratio kept) when
it is larger than the model's input ``(H, W)``, then padded symmetrically to
``(H, W)``. Predictions (class probabilities) go the other way: crop the pad,
resize bilinearly to ``(h, w)``, and only then take the argmax, so the labels
are as smooth as the probabilities allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def choose_input_size(
    slice_shape: tuple[int, int], *, max_side: int = 256, multiple: int = 32
) -> tuple[int, int]:
    """An input size for slices of ``slice_shape``: at most ``max_side``, divisible by ``multiple``.

    Parameters
    ----------
    slice_shape : tuple of int
        ``(h, w)`` of the slices in voxels.
    max_side : int
        Longest side of the input; larger slices are shrunk to fit.
    multiple : int
        The network's size divisor (``2 ** number of downsamplings``).
    """
    h, w = slice_shape
    scale = min(1.0, max_side / max(h, w))
    return (
        max(multiple, math.ceil(h * scale / multiple) * multiple),
        max(multiple, math.ceil(w * scale / multiple) * multiple),
    )


@dataclass(frozen=True)
class InputFit:
    """The resize + pad between a slice ``(h, w)`` and a model input ``(H, W)``.

    Attributes
    ----------
    slice_shape : tuple of int
        ``(h, w)`` in voxels.
    input_size : tuple of int
        ``(H, W)`` the network sees.
    """

    slice_shape: tuple[int, int]
    input_size: tuple[int, int]
    #: Explicit ``(h', w')`` the slice is resized to before padding (each side
    #: scaled on its own, e.g. to square the pixels of a coronal slice of a
    #: thick-slice scan); None: shrink-to-fit with the aspect ratio kept.
    resized: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.resized is not None and (
            self.resized[0] > self.input_size[0] or self.resized[1] > self.input_size[1]
        ):
            raise ValueError(f"resized {self.resized} exceeds the input size {self.input_size}")

    @property
    def scale(self) -> float:
        """Shrink factor (<= 1) applied to the slice."""
        (h, w), (hh, ww) = self.slice_shape, self.input_size
        return min(1.0, hh / h, ww / w)

    @property
    def resized_shape(self) -> tuple[int, int]:
        if self.resized is not None:
            return self.resized
        (h, w), (hh, ww) = self.slice_shape, self.input_size
        s = self.scale
        return (min(hh, max(1, round(h * s))), min(ww, max(1, round(w * s))))

    def _pads(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as ``F.pad`` wants them."""
        rh, rw = self.resized_shape
        hh, ww = self.input_size
        top, left = (hh - rh) // 2, (ww - rw) // 2
        return (left, ww - rw - left, top, hh - rh - top)

    def images_to_input(self, images: torch.Tensor, pad_value: float) -> torch.Tensor:
        """``(B, C, h, w)`` float -> ``(B, C, H, W)``: shrink (antialiased) and pad with ``pad_value``."""
        if self.resized_shape != self.slice_shape:
            images = F.interpolate(
                images,
                size=self.resized_shape,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return F.pad(images, self._pads(), value=pad_value)

    def labels_to_input(self, labels: torch.Tensor, pad_value: int = 0) -> torch.Tensor:
        """``(B, h, w)`` integer labels -> ``(B, H, W)`` (nearest neighbour, padded with ``pad_value``)."""
        if self.resized_shape != self.slice_shape:
            labels = F.interpolate(
                labels[:, None].float(), size=self.resized_shape, mode="nearest-exact"
            )[:, 0].to(labels.dtype)
        return F.pad(labels, self._pads(), value=pad_value)

    def probabilities_from_input(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` -> ``(B, K, h, w)``: crop the pad and resize back bilinearly."""
        left, _, top, _ = self._pads()
        rh, rw = self.resized_shape
        cropped = probabilities[:, :, top : top + rh, left : left + rw]
        if (rh, rw) != self.slice_shape:
            cropped = F.interpolate(
                cropped, size=self.slice_shape, mode="bilinear", align_corners=False
            )
        return cropped
