"""The DrasCLR encoder: a 3D CNN of CondConv3D layers conditioned on the patch location.

Architecture (Yu et al., "DrasCLR", Medical Image Analysis 2024; every
convolution a :class:`~napari_fewlabel.models.condconv3d.CondConv3d` with
``experts`` kernels mixed by the location of the patch in the lung):

==========================  ==========  ======  ============================
stage                       channels    stride  32^3 patch -> size
==========================  ==========  ======  ============================
conv 3^3                    1 -> 8      1       32
conv 3^3                    8 -> 8      2       16
residual block              8 -> 16     2       8
residual block              16 -> 32    2       4
residual block              32 -> 64    2       2
conv 3^3                    64 -> 128   2       1
global average pool         128                 the 128-d feature
==========================  ==========  ======  ============================

A residual block is conv-norm-ReLU-conv-norm plus a 1^3 (strided) CondConv
shortcut, then ReLU. Normalisation is GroupNorm (per sample, so it does not
depend on the batch and needs no synchronisation under DDP; DrasCLR uses
BatchNorm). The projection head for contrastive learning is
:class:`~napari_fewlabel.models.heads.MLPHead` 128-128-128.

Patches are cubes of ``patch_size`` voxels at ``patch_spacing_mm`` (DrasCLR:
32 voxels at 1 mm), CT clipped to [-1024, 240] HU and mapped to [-1, 1]
(:func:`napari_fewlabel.data.patches3d.normalize_hu`). Locations are patch
centres in the lung's bounding box scaled to [-1, 1]^3, ``(z, y, x)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.condconv3d import CondConv3d

#: ``architecture["name"]`` in the model card of a DrasCLR encoder or subtype model.
ARCHITECTURE_NAME = "drasclr3d"


@dataclass(frozen=True)
class DrasCLRConfig:
    """Widths and patch geometry of the DrasCLR encoder.

    Attributes
    ----------
    widths : tuple of int
        Output channels of the two stem convolutions, the residual blocks and
        the last convolution (DrasCLR: ``(8, 8, 16, 32, 64, 128)``); the last
        is the feature length.
    experts : int
        CondConv experts per convolution (DrasCLR: 8).
    patch_size : int
        Side of the cubic input patch in voxels (DrasCLR: 32).
    patch_spacing_mm : float
        Voxel size of the patch (DrasCLR: 1 mm); scans are resampled to it.
    """

    widths: tuple[int, ...] = (8, 8, 16, 32, 64, 128)
    experts: int = 8
    patch_size: int = 32
    patch_spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        if not 4 <= len(self.widths) <= 12 or not all(1 <= w <= 1024 for w in self.widths):
            raise FewLabelError(
                f"DrasCLR widths need two stem widths, at least one block and a feature width "
                f"(4 to 12 widths of 1 to 1024 channels), got {self.widths}."
            )
        if not (
            1 <= self.experts <= 64
            and 4 <= self.patch_size <= 256
            and 0 < self.patch_spacing_mm <= 100
        ):
            raise FewLabelError(
                "experts must be 1 to 64, patch_size 4 to 256 and patch_spacing_mm in (0, 100] "
                f"(got {self.experts}, {self.patch_size}, {self.patch_spacing_mm})."
            )

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return {"name": ARCHITECTURE_NAME, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DrasCLRConfig:
        if d.get("name") != ARCHITECTURE_NAME:
            raise FewLabelError(
                f"This model is a {d.get('name', 'unknown')!r} network, not a DrasCLR encoder: "
                "give a checkpoint written by `fewlabel pretrain --method drasclr` or by the "
                "emphysema subtype training."
            )
        try:
            return cls(
                widths=tuple(int(w) for w in d["widths"]),
                experts=int(d["experts"]),
                patch_size=int(d["patch_size"]),
                patch_spacing_mm=float(d["patch_spacing_mm"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise FewLabelError(
                f"The DrasCLR architecture in this model card is damaged ({e!r:.80}): re-save "
                "or re-train the model."
            ) from e


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(8, channels // 4)), channels)


class _ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, experts: int, act: bool = True) -> None:
        super().__init__()
        self.conv = CondConv3d(cin, cout, 3, stride=stride, padding=1, experts=experts, bias=False)
        self.norm = _norm(cout)
        self.act = act

    def forward(self, x: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x, locations))
        return F.relu(x, inplace=True) if self.act else x


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, experts: int) -> None:
        super().__init__()
        self.first = _ConvNormAct(cin, cout, stride, experts)
        self.second = _ConvNormAct(cout, cout, 1, experts, act=False)
        self.shortcut = CondConv3d(cin, cout, 1, stride=stride, experts=experts, bias=False)
        self.shortcut_norm = _norm(cout)

    def forward(self, x: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x, locations), locations)
        return F.relu(y + self.shortcut_norm(self.shortcut(x, locations)), inplace=True)


class DrasCLREncoder(nn.Module):
    """Location-conditioned 3D encoder: ``forward(patches, locations) -> features``.

    Parameters
    ----------
    config : DrasCLRConfig

    Notes
    -----
    ``patches``: ``(B, 1, P, P, P)`` normalised CT; ``locations``: ``(B, 3)`` in
    [-1, 1]; returns ``(B, config.feature_dim)``.
    """

    def __init__(self, config: DrasCLRConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DrasCLRConfig()
        w, k = config.widths, config.experts
        layers: list[nn.Module] = [_ConvNormAct(1, w[0], 1, k), _ConvNormAct(w[0], w[1], 2, k)]
        layers += [_ResidualBlock(a, b, 2, k) for a, b in itertools.pairwise(w[1:-1])]
        layers.append(_ConvNormAct(w[-2], w[-1], 2, k))
        self.layers = nn.ModuleList(layers)

    def forward(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        if patches.ndim != 5 or patches.shape[1] != 1 or locations.shape != (patches.shape[0], 3):
            raise ValueError(
                f"expected patches (B, 1, P, P, P) and locations (B, 3), got "
                f"{tuple(patches.shape)} and {tuple(locations.shape)}"
            )
        x = patches
        locations = locations.to(x.dtype)
        for layer in self.layers:
            x = layer(x, locations)
        return x.mean(dim=(2, 3, 4))


class SubtypeClassifier(nn.Module):
    """DrasCLR encoder + a small MLP: patches and locations -> class logits ``(B, classes)``.

    Parameters
    ----------
    config : DrasCLRConfig
    num_classes : int
        Outputs (emphysema subtypes: 4 -- normal, centrilobular, paraseptal, panlobular).
    hidden_dim : int
    """

    def __init__(self, config: DrasCLRConfig, num_classes: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.encoder = DrasCLREncoder(config)
        self.head = nn.Sequential(
            nn.Linear(config.feature_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(patches, locations))
