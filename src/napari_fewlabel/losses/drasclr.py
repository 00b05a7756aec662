"""DrasCLR's anatomy-specific contrast: InfoNCE against a queue of negatives per location.

DrasCLR (Yu et al., Medical Image Analysis 2024) learns patch features that
are specific to *where* in the lung a patch lies: the negatives of a patch at
location :math:`l` are patches of other scans at the same location, kept in
one MoCo queue per location (here: per bin of a regular grid over the
normalised lung box, :func:`location_bins`). With unit query :math:`q_i`, its
unit key :math:`k_i` and the keys :math:`u_{b(i),m}` queued for its bin
:math:`b(i)`, at temperature :math:`\\tau` (0.2):

.. math::

    \\ell(q_i, k_i) = -\\log
        \\frac{\\exp(q_i \\cdot k_i / \\tau)}
             {\\exp(q_i \\cdot k_i / \\tau) + \\sum_{m=1}^{K} \\exp(q_i \\cdot u_{b(i),m} / \\tau)}

The two terms of the loss use it with different queries and the same key
(the momentum encoder's embedding of a second augmentation of the patch):

* :math:`L_{local}`: :math:`q_i` is the embedding of the first augmentation
  of the same patch;
* :math:`L_{neighbour}`: :math:`q_i` is the (renormalised) sum of the
  embeddings of the patches at the two nearest locations.

:math:`L = L_{local} + L_{neighbour}`, each the mean of :math:`\\ell` over the batch.

:class:`LocationQueues` keeps the queues. Under ``torch.distributed`` its
:meth:`~LocationQueues.enqueue` gathers every rank's keys *and* their bins
(``all_gather``) before adding them, so all ranks hold the same queues.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def location_bins(locations: torch.Tensor, bins_per_axis: int) -> torch.Tensor:
    """Index of the grid bin of each location ``(B, 3)`` in [-1, 1]^3: ``(B,)`` int64."""
    cells = ((locations.clamp(-1, 1) + 1) / 2 * bins_per_axis).long().clamp(0, bins_per_axis - 1)
    return (cells[:, 0] * bins_per_axis + cells[:, 1]) * bins_per_axis + cells[:, 2]


def location_infonce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float = 0.2,
) -> torch.Tensor:
    """Mean of :math:`\\ell` (module docstring) over the batch.

    Parameters
    ----------
    queries : Tensor, shape (B, D)
        Unit queries (with gradient).
    keys : Tensor, shape (B, D)
        Unit positive keys (detached here).
    negatives : Tensor, shape (B, K, D)
        Unit negative keys of each query's location bin.
    temperature : float

    Returns
    -------
    Tensor, scalar
    """
    q = queries.float()
    positive = (q * keys.detach().float()).sum(dim=1, keepdim=True)
    negative = torch.einsum("bd,bkd->bk", q, negatives.detach().float())
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def neighbour_query(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The neighbour query: the sum of two unit embeddings ``(B, D)``, renormalised."""
    return F.normalize(first + second, dim=1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LocationQueues(nn.Module):
    """One first-in-first-out queue of unit keys per location bin, equal on every rank.

    Parameters
    ----------
    bins : int
        Number of location bins (``bins_per_axis ** 3``).
    size : int
        Keys kept per bin, :math:`K`.
    dim : int
        Length of a key.

    Attributes
    ----------
    keys : Tensor, shape (bins, size, dim)
        Random unit vectors at first (as in MoCo), replaced as keys arrive.
    pointers : Tensor, shape (bins,), int64
        Row of each bin where the next key goes.
    keys_seen : Tensor, shape (), int64
        Keys enqueued since the start, from all ranks.
    """

    keys: torch.Tensor
    pointers: torch.Tensor
    keys_seen: torch.Tensor

    def __init__(self, bins: int, size: int, dim: int) -> None:
        super().__init__()
        if bins < 1 or size < 1:
            raise ValueError(f"bins and size must be >= 1, got {bins} and {size}")
        self.bins = bins
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(bins, size, dim), dim=2))
        self.register_buffer("pointers", torch.zeros(bins, dtype=torch.int64))
        self.register_buffer("keys_seen", torch.zeros((), dtype=torch.int64))

    def negatives(self, bins: torch.Tensor) -> torch.Tensor:
        """The queued keys of each sample's bin: ``(B, size, dim)``."""
        return self.keys[bins.to(self.keys.device)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, bins: torch.Tensor) -> None:
        """Add keys ``(B, dim)`` to the queues of their ``bins`` ``(B,)``, from all ranks.

        Every rank must call this with the same ``B``; the gathered keys go
        in rank order, so the queues stay identical on every rank.
        """
        keys = keys.detach().to(self.keys.dtype)
        bins = bins.to(device=keys.device, dtype=torch.int64)
        if _world_size() > 1:
            gathered = [torch.empty_like(keys) for _ in range(_world_size())]
            gathered_bins = [torch.empty_like(bins) for _ in range(_world_size())]
            dist.all_gather(gathered, keys.contiguous())
            dist.all_gather(gathered_bins, bins.contiguous())
            keys, bins = torch.cat(gathered), torch.cat(gathered_bins)
        keys, bins = keys.to(self.keys.device), bins.to(self.keys.device)
        for b in torch.unique(bins).tolist():
            chosen = keys[bins == b][-self.size :]
            n = chosen.shape[0]
            start = int(self.pointers[b])
            rows = (torch.arange(n, device=self.keys.device) + start) % self.size
            self.keys[b, rows] = chosen
            self.pointers[b] = (start + n) % self.size
        self.keys_seen.add_(keys.shape[0])
