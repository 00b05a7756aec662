"""Feature decorrelation: a penalty on the off-diagonal of the feature correlation matrix.

med-moco's answer to dimensional collapse (embeddings of very similar
medical images spanning only a few directions): remove linear dependence
between feature dimensions. For a batch of :math:`N` embeddings
:math:`z_n \\in \\mathbb{R}^D`, standardised per dimension
(:math:`\\hat z_{nd} = (z_{nd} - \\bar z_d) / \\sigma_d`), the correlation
matrix is :math:`C = \\hat Z^\\top \\hat Z / (N - 1)` and

.. math::

    L_{decorr} = \\frac{1}{D (D - 1)} \\sum_{i \\ne j} C_{ij}^2 .

The penalty is on *correlations* (the covariance of standardised features)
rather than raw covariances, so it cannot be lowered by shrinking the features
towards zero -- which would itself be a collapse. It is 0 for uncorrelated
dimensions and 1 when every dimension is the same up to scale.
"""

from __future__ import annotations

import torch


def off_diagonal_correlation_penalty(embeddings: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared off-diagonal correlation (formula in the module docstring).

    Parameters
    ----------
    embeddings : Tensor, shape (N, D)
        A batch of feature vectors, ``N >= 2``, ``D >= 2``.
    eps : float
        Added to the variance so constant dimensions do not divide by zero.

    Returns
    -------
    Tensor, scalar
    """
    z = embeddings.float()
    n, d = z.shape
    if n < 2 or d < 2:
        raise ValueError(f"need at least 2 samples and 2 dimensions, got shape {tuple(z.shape)}")
    z = z - z.mean(dim=0)
    z = z / torch.sqrt(z.var(dim=0) + eps)
    corr = z.T @ z / (n - 1)
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / (d * (d - 1))
