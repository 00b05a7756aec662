"""Scores of a model during fine-tuning: a held-out Dice, and one that costs no label.

* :func:`held_out_dice`: the Dice on labelled slices kept out of training
  (only when the user asks for it: ``FinetuneSettings.validation_min_labelled``).
* :func:`stream_agreement`: the Dice between the two decoders' labels on a few
  unlabelled slices. It needs no label, so every painted slice trains; low
  agreement says the two streams still disagree about where the structures are.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_fewlabel.data.planes import CrossPlane
from napari_fewlabel.data.slice_stack import SliceStack
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.device import Precision, autocast

#: Unlabelled slices the stream agreement is measured on (evenly spread).
AGREEMENT_SLICES = 8


def foreground_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float | None:
    """Mean Dice over foreground classes present in ``truth`` or ``pred`` (hard labels)."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        denom = int(p.sum() + t.sum())
        if denom:
            scores.append(2 * int((p & t).sum()) / denom)
    return float(np.mean(scores)) if scores else None


def agreement_slices(unlabelled_pool: list[tuple[int, int]]) -> np.ndarray:
    """Up to :data:`AGREEMENT_SLICES` evenly spread unlabelled slices of the scan itself."""
    own = np.array([i for s, i in unlabelled_pool if s == 0], dtype=np.int64)
    if own.size > AGREEMENT_SLICES:
        own = own[np.linspace(0, own.size - 1, AGREEMENT_SLICES).astype(int)]
    return own


@torch.no_grad()
def held_out_dice(
    network: TwoStreamUNet,
    stack: SliceStack,
    held_out: np.ndarray,
    labels_by_slice: dict[int, torch.Tensor],
    num_classes: int,
    device: torch.device,
    precision: Precision,
) -> float | None:
    """Foreground Dice of the mean-of-streams prediction on the held-out slices."""
    if held_out.size == 0:
        return None
    network.eval()
    preds, truths = [], []
    for i in held_out:
        x = stack.windows(torch.tensor([int(i)]), network.config.in_slices).to(device)
        with autocast(device, precision):
            proba = network.predict_proba(x)
        preds.append(proba.argmax(dim=1).cpu())
        truths.append(labels_by_slice[int(i)][None])
    network.train()
    return foreground_dice(torch.cat(preds), torch.cat(truths), num_classes)


@torch.no_grad()
def stream_agreement(
    network: TwoStreamUNet,
    stack: SliceStack,
    slices: np.ndarray,
    num_classes: int,
    device: torch.device,
    precision: Precision,
) -> float | None:
    """Dice between the two streams' labels on ``slices`` (None when neither marks anything)."""
    if slices.size == 0:
        return None
    network.eval()
    x = stack.windows(torch.from_numpy(slices), network.config.in_slices).to(device)
    with autocast(device, precision):
        logits_a, logits_b = network(x)
    network.train()
    return foreground_dice(logits_a.argmax(dim=1).cpu(), logits_b.argmax(dim=1).cpu(), num_classes)


#: Slices of each plane across that :func:`plane_reliability` scores at most.
RELIABILITY_SLICES = 32


@torch.no_grad()
def plane_reliability(
    network: TwoStreamUNet,
    stack: SliceStack,
    labelled: np.ndarray,
    labels_by_slice: dict[int, torch.Tensor],
    cross_planes: list[CrossPlane],
    num_classes: int,
    device: torch.device,
    precision: Precision,
) -> list[float]:
    """How well each plane's predictions fit the labels it was trained on: a foreground Dice.

    The labelled plane is scored on its painted slices, each plane across on
    (up to :data:`RELIABILITY_SLICES` of) its slices whose labelled lines cross
    a structure, on those lines only. These are training labels, so the
    figures are optimistic; what they tell apart is a plane that has learnt a
    structure from one that has not (a small structure on one line per slice
    may not be learnt across in a short run). Prediction weights the planes
    by them, so a plane that has not learnt the structures does not outvote
    the ones that have.

    Returns
    -------
    list of float
        One Dice per plane, the labelled plane first (0 where a plane marks
        none of the labelled structures).
    """
    network.eval()
    in_slices = network.config.in_slices

    def dice_of(x: torch.Tensor, target: torch.Tensor) -> float:
        preds = []
        for start in range(0, x.shape[0], 4):  # bounded memory, as prediction does
            with autocast(device, precision):
                proba = network.predict_proba(x[start : start + 4].to(device))
            preds.append(proba.argmax(dim=1).cpu())
        pred = torch.cat(preds)
        known = target >= 0
        return foreground_dice(pred[known], target[known], num_classes) or 0.0

    painted = np.array([i for i in labelled if labels_by_slice[int(i)].any()], dtype=np.int64)
    scores = [
        dice_of(
            stack.windows(torch.from_numpy(painted), in_slices),
            torch.stack([labels_by_slice[int(i)] for i in painted]),
        )
        if painted.size
        else 1.0
    ]
    for plane in cross_planes:
        chosen = plane.crossing
        if chosen.size > RELIABILITY_SLICES:
            chosen = chosen[np.linspace(0, chosen.size - 1, RELIABILITY_SLICES).astype(int)]
        if chosen.size == 0:
            scores.append(0.0)
            continue
        centres = torch.from_numpy(chosen)
        scores.append(dice_of(plane.stack.windows(centres, in_slices), plane.targets[centres]))
    network.train()
    return scores
