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

Class balance. With ``class_balance`` :math:`= \\beta > 0` the cross-entropy is
weighted per class by :math:`w_k = f_k^{-\\beta}`, :math:`f_k` the share of the
batch's labelled pixels that are class :math:`k` (a weighted mean, so only
the ratios matter). A structure of 0.4 % of a slice otherwise gets almost no
gradient once the softmax has learnt that nearly everything is background:
:math:`\\partial p_k / \\partial z_k = p_k (1 - p_k)` vanishes with :math:`p_k`,
and the network sits at "all background" for most of a short run
(docs/engine.md, "Small structures"). :math:`\\beta = 0.5` (inverse square
root of the frequency) is the default of fine-tuning; 0 is the plain
cross-entropy of the published method.
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
        :math:`\\beta`: cross-entropy weights :math:`f_k^{-\\beta}` from the
        batch's labelled pixels (0: unweighted).

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
    weight = class_weights(target[valid], k, class_balance) if class_balance > 0 else None
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
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


def class_weights(labels: torch.Tensor, num_classes: int, balance: float) -> torch.Tensor:
    """Cross-entropy weights ``f_k ** -balance`` from labelled pixels (0 for absent classes).

    Parameters
    ----------
    labels : Tensor of int64
        The labelled pixels' classes (no ignore values).
    num_classes : int
    balance : float
        The exponent :math:`\\beta`.

    Returns
    -------
    Tensor, shape (num_classes,), float32
        Largest weight 1 (the rarest present class).
    """
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = (counts[present] / counts.sum()) ** -balance
    return weights / weights.max()
