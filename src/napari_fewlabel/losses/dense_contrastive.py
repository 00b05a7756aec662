"""Pixel-level InfoNCE between two views with known correspondence (IDEAL pretraining).

Two augmented views of the same slice are encoded densely and projected to
unit vectors per pixel (:class:`~napari_fewlabel.models.unet2d.DenseProjectionHead`).
Because the augmentation's geometry is known, a location sampled in view 1
has a known location in view 2: that pair is the positive; every other
sampled location, in the same image and in the other images of the batch, is
a negative. With :math:`N` sampled locations in total (over the batch), query
vectors :math:`q_i` (view 1), key vectors :math:`k_j` (view 2 at the mapped
locations), temperature :math:`\\tau` and :math:`s_{ij} = q_i \\cdot k_j / \\tau`:

.. math::

    L_{dense} = -\\frac{1}{N} \\sum_{i=1}^{N}
        \\log \\frac{\\sum_{j \\in P(i)} \\exp s_{ij}}{\\sum_{j=1}^{N} \\exp s_{ij}}

where :math:`P(i) = \\{i\\}` plus, with a neighbourhood radius :math:`r > 0`,
the locations of the same image whose source points lie within :math:`r` of
location :math:`i`'s (a multi-positive InfoNCE: near neighbours are not
pushed apart). :func:`symmetric_dense_infonce` averages both directions
(view 1 as queries, then view 2). Sampling a few hundred locations per image
bounds the memory to an :math:`N \\times N` similarity matrix instead of all
pixels squared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_dense(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample a dense map at continuous locations.

    Parameters
    ----------
    features : Tensor, shape (B, C, h, w)
        Dense feature map of a view.
    points : Tensor, shape (B, N, 2)
        ``(x, y)`` locations in the view's normalised coordinates
        (``[-1, 1]``, ``align_corners=False``: -1 and 1 are the outer edges of
        the border pixels, as in :func:`torch.nn.functional.grid_sample`).

    Returns
    -------
    Tensor, shape (B, N, C)
    """
    grid = points[:, :, None, :].to(features.dtype)
    # Border padding: a location in the outer half pixel takes the edge value, not a fade to 0.
    sampled = F.grid_sample(
        features, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[:, :, :, 0].transpose(1, 2)


def dense_infonce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float = 0.2,
    source_points: torch.Tensor | None = None,
    neighbourhood: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-level InfoNCE (formula in the module docstring), one direction.

    Parameters
    ----------
    queries, keys : Tensor, shape (B, N, D)
        Unit vectors at corresponding locations: ``keys[b, n]`` is the positive
        of ``queries[b, n]``. Keys are used as given (detach them for a
        momentum key encoder).
    temperature : float
        :math:`\\tau`; IDEAL uses 0.1-0.2.
    source_points : Tensor, shape (B, N, 2), optional
        The locations in the common source slice (normalised coordinates);
        needed when ``neighbourhood > 0``.
    neighbourhood : float
        Radius :math:`r` in source normalised coordinates within which other
        locations of the same image also count as positives (0: only the
        corresponding location).
    valid : Tensor, shape (B, N), bool, optional
        Locations to use (e.g. those inside both views); others are neither
        queries nor negatives.

    Returns
    -------
    Tensor, scalar
        Mean loss over the valid queries.
    """
    b, n, d = queries.shape
    q = queries.reshape(b * n, d).float()
    k = keys.reshape(b * n, d).float()
    logits = q @ k.T / temperature
    image = torch.arange(b, device=q.device).repeat_interleave(n)
    positive = torch.eye(b * n, dtype=torch.bool, device=q.device)
    if neighbourhood > 0:
        if source_points is None:
            raise ValueError("source_points are needed for a neighbourhood radius > 0")
        p = source_points.reshape(b * n, 2).float()
        close = torch.cdist(p, p) <= neighbourhood
        positive |= close & (image[:, None] == image[None, :])
    if valid is not None:
        keep = valid.reshape(b * n)
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
        positive &= keep[None, :]
    log_all = torch.logsumexp(logits, dim=1)
    log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    per_query = log_all - log_positive
    if valid is not None:
        keep = valid.reshape(b * n)
        return per_query[keep].mean() if bool(keep.any()) else per_query.sum() * 0.0
    return per_query.mean()


def symmetric_dense_infonce(
    view1: torch.Tensor,
    view2: torch.Tensor,
    key1: torch.Tensor,
    key2: torch.Tensor,
    *,
    temperature: float = 0.2,
    source_points: torch.Tensor | None = None,
    neighbourhood: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of :func:`dense_infonce` in both directions.

    Parameters
    ----------
    view1, view2 : Tensor, shape (B, N, D)
        Query vectors of view 1 and view 2 at corresponding locations.
    key1, key2 : Tensor, shape (B, N, D)
        Key vectors at the same locations (the same tensors as the queries for
        a shared encoder, a momentum encoder's otherwise).
    temperature, source_points, neighbourhood, valid
        As in :func:`dense_infonce`.
    """
    first = dense_infonce(
        view1, key2, temperature=temperature, source_points=source_points,
        neighbourhood=neighbourhood, valid=valid,
    )  # fmt: skip
    second = dense_infonce(
        view2, key1, temperature=temperature, source_points=source_points,
        neighbourhood=neighbourhood, valid=valid,
    )  # fmt: skip
    return 0.5 * (first + second)
