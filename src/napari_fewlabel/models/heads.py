"""Projection heads that pretraining puts on the encoder (and drops afterwards).

* :class:`MLPHead`: MoCo v2's two-layer MLP, ``Linear -> ReLU -> Linear``,
  on a pooled embedding, output L2-normalised.
* :func:`hypercolumn`: several encoder levels upsampled to the finest of them
  and concatenated, so a dense head sees deep and mid-level features at a
  resolution where locations can be told apart (the deepest map of a 128 px
  view is only 4 x 4). With ``levels=(-1,)`` it is the deepest map alone, as
  in IDEAL.

The dense 1x1-convolution head is
:class:`~napari_fewlabel.models.unet2d.DenseProjectionHead`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
    """``(N, in_dim)`` -> unit vectors ``(N, out_dim)`` through one hidden ReLU layer.

    Parameters
    ----------
    in_dim, hidden_dim, out_dim : int
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(x), dim=-1)


def hypercolumn(features: Sequence[torch.Tensor], levels: Sequence[int]) -> torch.Tensor:
    """Encoder levels upsampled (bilinear) to the first listed level's size and concatenated.

    Parameters
    ----------
    features : sequence of Tensor
        The encoder's outputs, full resolution first (``(B, C_i, h_i, w_i)``).
    levels : sequence of int
        Indices into ``features`` (negative from the deepest); the first sets
        the output size.

    Returns
    -------
    Tensor, shape (B, sum C_i, h, w)
    """
    chosen = [features[i] for i in levels]
    size = chosen[0].shape[-2:]
    return torch.cat(
        [
            f
            if f.shape[-2:] == size
            else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f in chosen
        ],
        dim=1,
    )


def level_channels(widths: Sequence[int], full_res_width: int, levels: Sequence[int]) -> int:
    """Channels of :func:`hypercolumn` for an encoder with these widths."""
    channels = [full_res_width, *widths]
    return sum(channels[i] for i in levels)
