"""Domain critic on multi-level features and logits (Dou et al. 2018's DCM).

The critic scores how "source-like" a network's internal state is: it reads
several encoder feature maps and the segmentation logits of a slice, brings
them to one resolution (``H / resolution_divisor``), projects each to a few
channels with a 1x1 convolution, concatenates them and runs a small strided
CNN down to one number per slice. It has no normalisation layer: a
Wasserstein critic must be a function of each sample alone (no batch
statistics), and weight clipping (:meth:`DomainCritic.clip_`) or a gradient
penalty keeps it roughly 1-Lipschitz.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize_to(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Every ``(B, C_i, h_i, w_i)`` map at ``size``: average-pooled down or bilinearly up."""
    out = []
    for m in maps:
        m = m.float()
        if m.shape[-2:] == size:
            out.append(m)
        elif m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
            out.append(F.adaptive_avg_pool2d(m, size))
        else:
            out.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
    return out


class DomainCritic(nn.Module):
    """Wasserstein critic on a list of maps at one resolution -> one score per slice.

    Parameters
    ----------
    in_channels : sequence of int
        Channels of each input map, in the order ``forward`` receives them.
    projected : int
        Channels each map is projected to before concatenation.
    width : int
        Channels of the strided convolutions.

    ``forward(maps)`` takes maps ``(B, C_i, h, w)`` of one size (see
    :func:`resize_to`) and returns scores ``(B,)``.
    """

    def __init__(self, in_channels: Sequence[int], projected: int = 16, width: int = 64) -> None:
        super().__init__()
        self.project = nn.ModuleList([nn.Conv2d(c, projected, 1) for c in in_channels])
        total = projected * len(in_channels)
        self.body = nn.Sequential(
            nn.Conv2d(total, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
        )
        self.score = nn.Linear(width, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([p(m) for p, m in zip(self.project, maps, strict=True)], dim=1)
        x = F.leaky_relu(x, 0.2)
        return self.score(self.body(x).mean(dim=(2, 3)))[:, 0]

    @torch.no_grad()
    def clip_(self, limit: float) -> None:
        """Clamp every weight and bias to ``[-limit, limit]`` (WGAN weight clipping)."""
        for p in self.parameters():
            p.clamp_(-limit, limit)


def gradient_penalty(
    critic: DomainCritic, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]
) -> torch.Tensor:
    """WGAN-GP term: ``mean((||grad critic(x_hat)||_2 - 1)^2)`` on random interpolates.

    ``x_hat = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per slice,
    shared by all maps of that slice (Gulrajani et al. 2017).
    """
    n = min(real[0].shape[0], fake[0].shape[0])
    alpha = torch.rand(n, 1, 1, 1, device=real[0].device)
    mixed = [
        (alpha * r[:n] + (1 - alpha) * f[:n]).requires_grad_(True)
        for r, f in zip(real, fake, strict=True)
    ]
    scores = critic(mixed)
    grads = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    squared = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norm = torch.sqrt(squared + 1e-12)
    return ((norm - 1) ** 2).mean()
