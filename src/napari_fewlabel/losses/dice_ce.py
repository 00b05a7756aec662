"""Dice + cross-entropy on labelled pixels (the supervised term of both streams).

For logits :math:`z` of shape ``(B, K, H, W)``, softmax :math:`p = \\mathrm{softmax}(z)`
and integer targets :math:`y` with an ignore value (pixels that are not
labelled, e.g. outside the painted rows of a coronal slice), over the set
:math:`\\Omega` of labelled pixels:

.. math::

    \\mathrm{CE} = -\\frac{1}{|\\Omega|} \\sum_{i \\in \\Omega} \\log p_{y_i, i}

    \\mathrm{Dice}_k = \\frac{2 \\sum_{i \\in \\Omega} p_{k,i} [y_i = k] + \\epsilon}
                            {\\sum_{i \\in \\Omega} p_{k,i} + \\sum_{i \\in \\Omega} [y_i = k] + \\epsilon}

    L = \\mathrm{CE} + 1 - \\frac{1}{|P|} \\sum_{k \\in P} \\mathrm{Dice}_k

where :math:`P` is the set of foreground classes present in the batch's
targets (:math:`L = \\mathrm{CE}` when there is none). The Dice is a *batch*
Dice (sums over all pixels of the batch, as nnU-Net does): with one or two
labelled slices a per-slice Dice of a structure absent from that slice would
be noise. Classes absent from the batch are left to the cross-entropy: their
Dice would be :math:`\\epsilon / (\\sum p_k + \\epsilon) \\approx 0` whatever the
network does, a constant that only hides the present classes' progress.

Class balance. With ``class_balance`` :math:`= \\beta > 0` each slice's
cross-entropy is weighted per class by :math:`w_k = f_k^{-\\beta}`, :math:`f_k`
the share of that slice's labelled pixels that are class :math:`k` (a weighted
mean within the slice, then the mean over the slices). A structure of 0.4 %
of a slice otherwise gets almost no gradient once the softmax has learnt that
nearly everything is background: :math:`\\partial p_k / \\partial z_k = p_k (1 - p_k)`
vanishes with :math:`p_k`, and the network sits at "all background" for most
of a short run (docs/engine.md, "Small structures"). Per slice, not per batch:
a slice that holds background only (a slice the user marked empty, a line of
a plane across that crosses no structure) keeps its plain cross-entropy, so
marking a slice empty still says "nothing here" with full weight.
:math:`\\beta = 0.5` (inverse square root of the share) is the default of
fine-tuning; 0 is the plain cross-entropy of the published method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Target value for pixels that carry no label.
IGNORE_INDEX = -1


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1e-5,
    class_balance: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dice + cross-entropy.

    Parameters
    ----------
    logits : Tensor, shape (B, K, H, W)
    target : Tensor, shape (B, H, W), int64
        Class indices, ``ignore_index`` where unlabelled.
    ignore_index : int
    smooth : float
        :math:`\\epsilon` in the Dice.
    class_balance : float
        :math:`\\beta`: cross-entropy weights :math:`f_k^{-\\beta}` from each
        slice's labelled pixels (0: the plain cross-entropy over the batch).

    Returns
    -------
    loss : Tensor, scalar
    parts : dict
        ``{"ce": float, "dice": float}``: the mean soft Dice of the present
        foreground classes (NaN when none is present), not the loss.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, {"ce": 0.0, "dice": float("nan")}
    logits = logits.float()
    k = logits.shape[1]
    if class_balance > 0:
        ce = balanced_cross_entropy(logits, target, valid, class_balance, ignore_index)
    else:
        ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.clamp(min=0), k).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid[:, None].to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = onehot.sum(dims)[1:] > 0
    if not bool(present.any()):
        return ce, {"ce": float(ce.detach()), "dice": float("nan")}
    foreground_dice = dice[1:][present].mean()
    loss = ce + 1 - foreground_dice
    return loss, {"ce": float(ce.detach()), "dice": float(foreground_dice.detach())}


def balanced_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    balance: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy with each slice's classes weighted by their share to the power ``-balance``.

    Parameters
    ----------
    logits : Tensor, shape (B, K, H, W), float32
    target : Tensor, shape (B, H, W), int64
    valid : Tensor of bool, shape (B, H, W)
        ``target != ignore_index``.
    balance : float
        The exponent :math:`\\beta` (> 0).

    Returns
    -------
    Tensor, scalar
        The mean over the slices holding labelled pixels of each slice's
        weighted mean cross-entropy.
    """
    k = logits.shape[1]
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    onehot = F.one_hot(target.clamp(min=0), k) * valid[..., None]  # (B, H, W, K)
    counts = onehot.sum(dim=(1, 2)).float()  # (B, K)
    weights = class_weights(counts, balance)  # (B, K)
    pixel_weights = weights.gather(1, target.clamp(min=0).flatten(1)).view_as(nll) * valid
    per_slice_weight = pixel_weights.sum(dim=(1, 2))
    has_labels = per_slice_weight > 0
    per_slice = (pixel_weights * nll).sum(dim=(1, 2))[has_labels] / per_slice_weight[has_labels]
    return per_slice.mean()


def class_weights(counts: torch.Tensor, balance: float) -> torch.Tensor:
    """Weights ``f_k ** -balance`` from pixel counts per class (0 for absent classes).

    Parameters
    ----------
    counts : Tensor, shape (..., K)
        Labelled pixels of each class (per slice along the leading axes).
    balance : float
        The exponent :math:`\\beta`.

    Returns
    -------
    Tensor, shape (..., K), float32
        The rarest present class weighs 1; all zeros where nothing is counted.
    """
    counts = counts.float()
    total = counts.sum(dim=-1, keepdim=True).clamp(min=1)
    present = counts > 0
    share = torch.where(present, counts / total, torch.ones_like(counts))
    weights = torch.where(present, share**-balance, torch.zeros_like(counts))
    return weights / weights.amax(dim=-1, keepdim=True).clamp(min=1e-12)
