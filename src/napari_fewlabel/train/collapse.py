"""Effective rank: how many directions a set of embeddings really uses.

A training diagnostic, not an objective (so it lives with the jobs that log
it, not in ``losses/``). med-moco logs it to show dimensional collapse: the
embeddings of MoCo v2 on medical images span far fewer directions than
their length. With the singular values :math:`\\sigma_1, ..., \\sigma_r` of
the centred embedding matrix :math:`Z - \\bar Z` (``N x D``) and
:math:`p_i = \\sigma_i / \\sum_j \\sigma_j`,

.. math::

    \\mathrm{erank}(Z) = \\exp\\Big(-\\sum_i p_i \\log p_i\\Big)

(Roy & Vetterli, 2007). It lies between 1 (one direction) and
:math:`\\min(N - 1, D)` (a flat spectrum); a value much smaller than the
dimension means collapse.
"""

from __future__ import annotations

import torch


def effective_rank(embeddings: torch.Tensor) -> float:
    """Effective rank of ``embeddings`` (formula in the module docstring).

    Parameters
    ----------
    embeddings : Tensor, shape (N, D)
        One embedding per row, ``N >= 2``.

    Returns
    -------
    float
        In ``[1, min(N - 1, D)]``; 1.0 for embeddings that are all equal.
    """
    z = embeddings.detach().double()
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, D) matrix, got shape {tuple(z.shape)}")
    z = z - z.mean(dim=0)
    singular = torch.linalg.svdvals(z)
    total = singular.sum()
    if total <= 0:
        return 1.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
