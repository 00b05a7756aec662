"""Label-free checks of an adapted model on the target CT: is it better than where it started?

Adaptation (:mod:`napari_fewlabel.train.adapt`) has no CT labels, so it
cannot measure Dice; on a real MRI -> CT pair it can lower it while the
critic is satisfied. Every few joint updates, and once at the start (the
unadapted MRI model fed the HU-windowed CT), the network is scored on a fixed
set of target slices with figures that need no label:

``entropy``
    Mean per-pixel entropy of the two streams' mean softmax, divided by
    ``log K`` (0 = certain everywhere, 1 = uniform). Lower is better.
``stream_agreement``
    Dice between the argmax of decoder A and of decoder B, averaged over the
    foreground classes either predicts. Higher is better.
``start_agreement``
    Dice between this network's labels and the start's, averaged over the
    foreground classes. Higher means closer to the start (it ranks the start
    first by construction: a measure of drift, not of quality).
``flip_agreement``
    Dice between the labels of the slices and of their left-right mirror
    images (mapped back). Higher is better.
``proportion_gap``
    Total variation distance between the class proportions predicted on the
    CT slices and those the source model predicts on its own MRI slices
    (the proportions of the MRI labels, as the model learnt them). Lower is
    better.
``foreground_proportion_gap``
    The same among the foreground classes only (the share of each structure
    in the predicted foreground), blind to a different field of view. Lower
    is better.

:data:`HIGHER_IS_BETTER` says which way each one points; :func:`quality`
turns a score into "higher is better". docs/adaptation.md records how well
each ranks checkpoints by their true Dice (Spearman) on the phantom and the
real head pair, and which one adaptation uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train import finetune_scores
from napari_fewlabel.train.device import Precision, autocast

#: The candidates and whether a higher value means a better model.
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "entropy": False,
    "stream_agreement": True,
    "start_agreement": True,
    "flip_agreement": True,
    "proportion_gap": False,
    "foreground_proportion_gap": False,
}
#: Slices per forward pass of a check.
_BATCH = 8


@dataclass(frozen=True)
class CheckReference:
    """What every check compares against; built once per adaptation run.

    Attributes
    ----------
    target_windows : Tensor, shape (n, in_slices, H, W)
        The target CT slices (windows of adjacent slices) every check scores,
        normalised as the adapted model sees them.
    start_labels : Tensor, shape (n, H, W), int64
        The start network's labels of those slices.
    source_proportions : Tensor, shape (K,)
        Share of each class in the source model's labels of its MRI slices.
    num_classes : int
    """

    target_windows: torch.Tensor
    start_labels: torch.Tensor
    source_proportions: torch.Tensor
    num_classes: int


def _streams(
    network: TwoStreamUNet, windows: torch.Tensor, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of decoders A and B for ``windows``, ``(n, K, H, W)`` each, float32 on the CPU."""
    out_a, out_b = [], []
    with torch.no_grad():
        for start in range(0, windows.shape[0], _BATCH):
            x = windows[start : start + _BATCH].to(device)
            with autocast(device, precision):
                features = network.encoder(x)
                logits_a, logits_b = network.decoder_a(features), network.decoder_b(features)
            out_a.append(logits_a.float().softmax(1).cpu())
            out_b.append(logits_b.float().softmax(1).cpu())
    return torch.cat(out_a), torch.cat(out_b)


def predicted_labels(
    network: TwoStreamUNet, windows: torch.Tensor, device: torch.device, precision: Precision
) -> torch.Tensor:
    """Argmax of the two streams' mean softmax, ``(n, H, W)`` int64 on the CPU."""
    p_a, p_b = _streams(network, windows, device, precision)
    return ((p_a + p_b) / 2).argmax(1)


def class_proportions(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of each class among the pixels of ``labels``, ``(K,)`` float64."""
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).double()
    return counts / counts.sum().clamp(min=1)


def foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Dice of two label maps averaged over the foreground classes either holds (1.0 if none:
    two empty maps agree)."""
    dice = finetune_scores.foreground_dice(a, b, num_classes)
    return 1.0 if dice is None else dice


def _total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(0.5 * (p - q).abs().sum())


def label_free_scores(
    network: TwoStreamUNet,
    reference: CheckReference,
    device: torch.device,
    precision: Precision,
) -> dict[str, float]:
    """Every candidate of the module docstring for ``network`` on ``reference``'s slices."""
    k = reference.num_classes
    windows = reference.target_windows
    p_a, p_b = _streams(network, windows, device, precision)
    p = (p_a + p_b) / 2
    labels = p.argmax(1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(1).mean() / math.log(k)
    f_a, f_b = _streams(network, windows.flip(-1), device, precision)
    flipped = ((f_a + f_b) / 2).argmax(1).flip(-1)
    proportions = class_proportions(labels, k)
    fg, fg_source = proportions[1:], reference.source_proportions[1:]
    return {
        "entropy": float(entropy),
        "stream_agreement": foreground_dice(p_a.argmax(1), p_b.argmax(1), k),
        "start_agreement": foreground_dice(labels, reference.start_labels, k),
        "flip_agreement": foreground_dice(labels, flipped, k),
        "proportion_gap": _total_variation(proportions, reference.source_proportions),
        "foreground_proportion_gap": _total_variation(
            fg / fg.sum().clamp(min=1e-12), fg_source / fg_source.sum().clamp(min=1e-12)
        ),
    }


def quality(scores: Mapping[str, float], check: str) -> float:
    """The score ``check`` of ``scores`` signed so that higher means better."""
    value = float(scores[check])
    return value if HIGHER_IS_BETTER[check] else -value
