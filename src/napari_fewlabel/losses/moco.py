"""MoCo's InfoNCE with a queue of negatives (MoCo v2, as used by med-moco).

A query :math:`q` (the momentum-free encoder's projection of view 1) must
pick its key :math:`k_+` (the momentum encoder's projection of view 2 of the
same slice) out of the keys of the other slices in the batch and the
:math:`K` keys in the queue, all unit vectors, at temperature :math:`\\tau`:

.. math::

    L_{moco} = -\\frac{1}{B} \\sum_{i=1}^{B} \\log
        \\frac{\\exp(q_i \\cdot k_i / \\tau)}
             {\\sum_{j=1}^{B} \\exp(q_i \\cdot k_j / \\tau)
              + \\sum_{m=1}^{K} \\exp(q_i \\cdot u_m / \\tau)}

where :math:`u_m` are the queued keys of earlier batches. (Original MoCo
uses only the queue and the positive; keeping the batch's other keys as
negatives too changes little with large queues and helps with the short
queues that small data sets call for.) Keys carry no gradient.

:class:`KeyQueue` keeps the last :math:`K` keys. Under ``torch.distributed``
its :meth:`~KeyQueue.enqueue` gathers the keys of every rank
(``all_gather``) before adding them, so every rank holds the same queue and
the negatives come from the whole global batch, as in MoCo's multi-GPU code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def moco_infonce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    queue: torch.Tensor | None = None,
    *,
    temperature: float = 0.2,
) -> torch.Tensor:
    """MoCo InfoNCE (formula in the module docstring).

    Parameters
    ----------
    queries : Tensor, shape (B, D)
        Unit query vectors (with gradient).
    keys : Tensor, shape (B, D)
        Unit key vectors; ``keys[i]`` is the positive of ``queries[i]``.
        Detached here.
    queue : Tensor, shape (K, D), optional
        Unit keys of earlier batches (negatives).
    temperature : float
        :math:`\\tau` (0.2 in MoCo v2).

    Returns
    -------
    Tensor, scalar
    """
    q = queries.float()
    k = keys.detach().float()
    logits = q @ k.T
    if queue is not None and queue.numel():
        logits = torch.cat([logits, q @ queue.detach().float().T], dim=1)
    target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits / temperature, target)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class KeyQueue(nn.Module):
    """A first-in-first-out queue of unit key vectors, kept equal on every rank.

    Parameters
    ----------
    size : int
        :math:`K`, the number of keys kept.
    dim : int
        Length of a key.

    Attributes
    ----------
    keys : Tensor, shape (size, dim)
        Starts as random unit vectors (MoCo's initialisation), replaced as
        batches arrive.
    pointer : Tensor, shape (), int64
        Row where the next key goes.
    keys_seen : Tensor, shape (), int64
        Keys enqueued since the start, from all ranks (kept in checkpoints).
    """

    keys: torch.Tensor
    pointer: torch.Tensor
    keys_seen: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("keys_seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Add a batch of keys ``(B, dim)``, from all ranks when distributed.

        Every rank must call this with the same ``B`` (``all_gather`` needs
        equal shapes); the gathered keys go in rank order, so the queues stay
        identical.
        """
        keys = keys.detach().to(self.keys.dtype)
        if _world_size() > 1:
            gathered = [torch.empty_like(keys) for _ in range(_world_size())]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        keys = keys[-self.size :]  # a batch larger than the queue keeps its last keys
        n = keys.shape[0]
        start = int(self.pointer)
        rows = (torch.arange(n, device=self.keys.device) + start) % self.size
        self.keys[rows] = keys.to(self.keys.device)
        self.pointer.fill_((start + n) % self.size)
        self.keys_seen.add_(n)
