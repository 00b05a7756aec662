"""Cross pseudo-supervision between two streams (IDEAL fine-tuning, unlabelled slices).

Each stream is trained on the other's hard pseudo-labels, with no gradient
through the pseudo-labels. With logits :math:`z^1, z^2` (the students) and
:math:`t^1, t^2` (the teachers: the same logits, or the logits of a weakly
augmented view of the same pixels), :math:`q^s = \\mathrm{softmax}(t^s)`,
pseudo-labels :math:`\\hat y^s_i = \\arg\\max_k q^s_{k,i}` and confidence mask
:math:`m^s_i = [\\max_k q^s_{k,i} \\ge \\tau]`, over the :math:`N` pixels:

.. math::

    L_{cps} = \\frac{1}{N} \\sum_i m^2_i \\, \\mathrm{CE}(z^1_i, \\hat y^2_i)
            + \\frac{1}{N} \\sum_i m^1_i \\, \\mathrm{CE}(z^2_i, \\hat y^1_i)

:math:`\\tau = 0` and teachers = students is the paper's loss,
:math:`\\mathrm{CE}(p_1, \\arg\\max p_2) + \\mathrm{CE}(p_2, \\arg\\max p_1)`.
A threshold :math:`\\tau > 0` keeps only confident pseudo-labels (FixMatch);
dividing by :math:`N`, not by the number kept, lets the term grow as the
streams become confident instead of trusting a handful of early pixels.

The weight of the term is ramped up with :func:`sigmoid_rampup`
(Laine & Aila): :math:`w(t) = \\exp(-5 (1 - t/T)^2)` for :math:`t < T`, 1 after.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_pseudo_supervision_loss(
    logits_1: torch.Tensor,
    logits_2: torch.Tensor,
    *,
    teacher_1: torch.Tensor | None = None,
    teacher_2: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross pseudo-supervision loss.

    Parameters
    ----------
    logits_1, logits_2 : Tensor, shape (B, K, H, W)
        The two streams' logits that receive gradients.
    teacher_1, teacher_2 : Tensor, shape (B, K, H, W), optional
        Logits the pseudo-labels come from (default: ``logits_1``/``logits_2``);
        always detached.
    threshold : float
        Minimum softmax confidence :math:`\\tau` of a pseudo-label (0 keeps all).

    Returns
    -------
    loss : Tensor, scalar
    parts : dict
        ``{"cps_kept": fraction of pseudo-labels above the threshold}``.
    """
    t1 = (logits_1 if teacher_1 is None else teacher_1).detach().float().softmax(dim=1)
    t2 = (logits_2 if teacher_2 is None else teacher_2).detach().float().softmax(dim=1)
    conf_1, pseudo_1 = t1.max(dim=1)
    conf_2, pseudo_2 = t2.max(dim=1)
    keep_1 = (conf_1 >= threshold).float()
    keep_2 = (conf_2 >= threshold).float()
    ce_1 = F.cross_entropy(logits_1.float(), pseudo_2, reduction="none")
    ce_2 = F.cross_entropy(logits_2.float(), pseudo_1, reduction="none")
    loss = (ce_1 * keep_2).mean() + (ce_2 * keep_1).mean()
    kept = float(0.5 * (keep_1.mean() + keep_2.mean()))
    return loss, {"cps_kept": kept}


def sigmoid_rampup(step: float, length: float) -> float:
    """Weight in [0, 1] that rises smoothly over ``length`` steps: ``exp(-5 (1 - step/length)^2)``.

    Returns 1 when ``length <= 0`` (no ramp) or once ``step >= length``, and 0 for ``step < 0``.
    """
    if length <= 0 or step >= length:
        return 1.0
    if step < 0:
        return 0.0
    phase = 1.0 - step / length
    return math.exp(-5.0 * phase * phase)
