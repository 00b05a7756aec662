"""A tiny untrained two-stream model with a consistent card, for tests that need one."""

from __future__ import annotations

import torch

from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.models.checkpoint import ModelCard, SegmentationModel
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig


def make_model(
    *,
    num_classes: int = 3,
    in_slices: int = 3,
    input_size: tuple[int, int] = (32, 32),
    slice_axis: int = 0,
    flips: bool = False,
    seed: int = 0,
) -> SegmentationModel:
    """An untrained (random) model with a consistent card: prediction mechanics only."""
    torch.manual_seed(seed)
    config = UNetConfig(
        in_slices=in_slices, num_classes=num_classes, widths=(8, 16), full_res_width=4
    )
    card = ModelCard(
        architecture=config.to_dict(),
        classes=default_classes(num_classes),
        modality="MR",
        normalization=NormalizationConfig.for_modality("MR"),
        input_size=input_size,
        slice_axis=slice_axis,
        inference={"test_time_flips": flips},
    )
    return SegmentationModel(TwoStreamUNet(config).eval(), card)
