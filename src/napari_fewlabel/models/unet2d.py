"""A 2D U-Net encoder shared by two decoders of different design (IDEAL's two streams).

Layout (``widths = (w0, ..., wn)``, input ``(B, k, H, W)`` with ``k`` adjacent
slices as channels)::

    full-res stem   k -> f           (H, W)       one conv: keeps edges for the output
    down            f -> w0, /2      (H/2, W/2)   strided conv
    level i         w(i-1) -> wi     /2 each      max-pool + 2 x (conv-norm-LeakyReLU)

    decoder A: 2x2 transposed convolutions to go up          -> logits (B, K, H, W)
    decoder B: 3x3 convolution + bilinear upsampling to go up -> logits (B, K, H, W)
    (each decoder level: upsample, concatenate the skip, one conv-norm-LeakyReLU)

Most of the work happens at half resolution and below (as in MONAI's UNet,
whose first convolution is strided), which keeps a training step on two CPU
cores under a second at 256x256. GroupNorm (or InstanceNorm) instead of
BatchNorm: statistics per sample, so batch sizes of 1-2 train fine.

The two decoders differ in architecture on purpose: cross pseudo-supervision
needs two views of the data that do not collapse into one.
:class:`DenseProjectionHead` is the 1x1-convolution head that dense
contrastive pretraining puts on the encoder's feature map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from napari_fewlabel.errors import FewLabelError

ARCHITECTURE_NAME = "TwoStreamUNet2d"
# Bounds a config (and so a model card) must keep: far above any useful network, far
# below one that would try to allocate terabytes.
MAX_IN_SLICES = 31
MAX_CLASSES = 1000
MAX_LEVELS = 8
MAX_WIDTH = 1024


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`TwoStreamUNet`; stored in the model card.

    Attributes
    ----------
    in_slices : int
        Adjacent slices given as channels (odd: the middle one is segmented).
    num_classes : int
        Output classes including background.
    widths : tuple of int
        Channels per encoder level, from half resolution down.
    full_res_width : int
        Channels of the full-resolution stem and last decoder layer. 12: with
        8 the network could sit at one structure for 100+ steps before it
        began to learn a few labelled slices (docs/engine.md).
    norm : {"group", "instance"}
        Normalisation layer; both work with batch size 1.
    """

    in_slices: int = 1
    num_classes: int = 2
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    full_res_width: int = 12
    norm: Literal["group", "instance"] = "group"

    def __post_init__(self) -> None:
        if not 1 <= self.in_slices <= MAX_IN_SLICES or self.in_slices % 2 == 0:
            raise FewLabelError(
                f"in_slices must be an odd number from 1 to {MAX_IN_SLICES} (the middle slice "
                f"is segmented), got {self.in_slices}."
            )
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise FewLabelError(
                f"num_classes must be from 2 to {MAX_CLASSES}, got {self.num_classes}."
            )
        if not 2 <= len(self.widths) <= MAX_LEVELS:
            raise FewLabelError(f"Give two to {MAX_LEVELS} encoder widths, got {len(self.widths)}.")
        if not all(1 <= w <= MAX_WIDTH for w in (*self.widths, self.full_res_width)):
            raise FewLabelError(
                f"Widths must be from 1 to {MAX_WIDTH} channels, got {list(self.widths)} and "
                f"full_res_width {self.full_res_width}."
            )
        if self.norm not in ("group", "instance"):
            raise FewLabelError(f"norm must be 'group' or 'instance', got {self.norm!r}.")

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": ARCHITECTURE_NAME,
            "in_slices": self.in_slices,
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "full_res_width": self.full_res_width,
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        if d.get("name", ARCHITECTURE_NAME) != ARCHITECTURE_NAME:
            raise FewLabelError(
                f"This checkpoint holds a {d.get('name')!r} network, not a {ARCHITECTURE_NAME}: "
                "use it with the command made for it."
            )
        values = {key: d.get(key) for key in ("in_slices", "num_classes", "full_res_width")}
        widths = d.get("widths")
        if not isinstance(widths, list | tuple) or not all(_is_whole(w) for w in widths):
            raise FewLabelError(f"widths must be a list of whole numbers, got {widths!r:.60}.")
        for key, value in values.items():
            if not _is_whole(value):
                raise FewLabelError(f"{key} must be a whole number, got {value!r:.40}.")
        if d.get("norm") not in ("group", "instance"):
            raise FewLabelError(f"norm must be 'group' or 'instance', got {d.get('norm')!r:.40}.")
        return cls(
            in_slices=d["in_slices"],
            num_classes=d["num_classes"],
            widths=tuple(widths),
            full_res_width=d["full_res_width"],
            norm=d["norm"],
        )


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that, when training on the CPU in bfloat16, normalises in float32.

    PyTorch's CPU kernel for the backward of a bfloat16 group norm in
    channels-last layout is slow: it took 40 % of a default training step,
    against 7 % in float32 (torch 2.13, docs/benchmarks.md). The result goes
    back to bfloat16 at once, so the activation, the concatenations and the
    next convolution stay in bfloat16 (left in float32 they cost a fifth of
    the step in conversions and memory traffic). Prediction keeps the
    bfloat16 kernel, which is fast forward. Same parameters and state dict as
    ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_grad_enabled():
            y = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
            return y.to(x.dtype)
        return super().forward(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return GroupNorm(groups, channels)


def _conv_norm_act(cin: int, cout: int, norm: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        _norm(norm, cout),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(_conv_norm_act(cin, cout, norm), _conv_norm_act(cout, cout, norm))


class Encoder(nn.Module):
    """Shared encoder: ``(B, k, H, W)`` -> feature maps, full resolution first.

    ``forward`` returns ``[stem (B, f, H, W), level0 (B, w0, H/2, W/2), ...,
    deepest (B, wn, H/2^(n+1), W/2^(n+1))]``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        f, w = config.full_res_width, config.widths
        #: channels of the deepest feature map (what a projection head sits on)
        self.out_channels = w[-1]
        self.stem = _conv_norm_act(config.in_slices, f, config.norm)
        self.down = _conv_norm_act(f, w[0], config.norm, stride=2)
        self.levels = nn.ModuleList(
            [_double_conv(w[0], w[0], config.norm)]
            + [_double_conv(w[i - 1], w[i], config.norm) for i in range(1, len(w))]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.stem(x)
        features = [stem]
        y = self.down(stem)
        for i, level in enumerate(self.levels):
            if i > 0:
                y = F.max_pool2d(y, 2)
            y = level(y)
            features.append(y)
        return features


def _upsampler(kind: str, cin: int, cout: int, norm: str) -> nn.Module:
    if kind == "transposed":
        return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
    # The 3x3 convolution runs before the upsampling: same receptive field, a quarter of the work.
    return nn.Sequential(
        _conv_norm_act(cin, cout, norm),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )


class Decoder(nn.Module):
    """U-Net decoder: ``features`` -> logits ``(B, K, H, W)``.

    Parameters
    ----------
    config : UNetConfig
    upsampling : {"transposed", "bilinear"}
        Transposed 2x2 convolutions (stream A) or a 3x3 convolution followed by
        bilinear upsampling (stream B).
    """

    def __init__(self, config: UNetConfig, upsampling: Literal["transposed", "bilinear"]) -> None:
        super().__init__()
        w, f, norm = config.widths, config.full_res_width, config.norm
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(len(w) - 2, -1, -1):
            self.ups.append(_upsampler(upsampling, w[i + 1], w[i], norm))
            self.fuse.append(_conv_norm_act(2 * w[i], w[i], norm))
        self.up_full = _upsampler(upsampling, w[0], f, norm)
        # No normalisation right before the classifier: normalising the last
        # features per sample slowed learning several-fold in our measurements.
        self.fuse_full = nn.Sequential(
            nn.Conv2d(2 * f, f, 3, padding=1), nn.LeakyReLU(0.01, inplace=True)
        )
        self.head = nn.Conv2d(f, config.num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        y = features[-1]
        skips = features[1:-1][::-1]
        for up, fuse, skip in zip(self.ups, self.fuse, skips, strict=True):
            y = fuse(torch.cat([up(y), skip], dim=1))
        y = self.fuse_full(torch.cat([self.up_full(y), features[0]], dim=1))
        return self.head(y)


class TwoStreamUNet(nn.Module):
    """Shared encoder + two decoders; the IDEAL fine-tuning network.

    ``forward(x)`` with ``x`` of shape ``(B, in_slices, H, W)`` (``H``, ``W``
    multiples of ``config.size_divisor``) returns the logits of both streams,
    each ``(B, num_classes, H, W)``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder_a = Decoder(config, "transposed")
        self.decoder_b = Decoder(config, "bilinear")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.decoder_a(features), self.decoder_b(features)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the two streams' softmax, ``(B, num_classes, H, W)``."""
        logits_a, logits_b = self(x)
        return 0.5 * (logits_a.float().softmax(dim=1) + logits_b.float().softmax(dim=1))


class DenseProjectionHead(nn.Module):
    """A single 1x1 convolution on a dense feature map, L2-normalised per pixel.

    ``(B, C, h, w)`` -> ``(B, dim, h, w)`` with unit-norm vectors along dim 1
    (IDEAL's dense projection for pixel-level InfoNCE).
    """

    def __init__(self, in_channels: int, dim: int = 128) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=1)
