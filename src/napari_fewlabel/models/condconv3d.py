"""CondConv3D: a 3D convolution whose kernel is mixed from experts by the patch location.

DrasCLR (Yu et al., Medical Image Analysis 2024) conditions every convolution
of its encoder on where the patch lies in the lung: a router turns the patch
location :math:`l \\in [-1, 1]^3` into expert weights
:math:`r(l) = \\sigma(W_r l + b_r) \\in (0, 1)^K` (a sigmoid, not a softmax: the
experts are not competing), and the kernel applied to the patch is

.. math::

    W(l) = \\sum_{k=1}^{K} r_k(l) \\, W_k, \\qquad b(l) = \\sum_k r_k(l) \\, b_k

(CondConv, Yang et al. 2019). Each sample has its own kernel; the batch is
convolved in one call as a grouped convolution with one group per sample.
Where the output has no more voxels than there are experts (the deep layers
of a small patch), the same result is computed more cheaply as
:math:`\\sum_k r_k(l) (W_k * x)`: every expert's output, mixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CondConv3d(nn.Module):
    """A 3D convolution with ``experts`` kernels mixed per sample by a location router.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Side of the cubic kernel.
    stride, padding : int
    experts : int
        :math:`K`, the number of expert kernels (8 in DrasCLR).
    location_dim : int
        Length of the location vector the router reads (3: ``(z, y, x)``).
    bias : bool

    Notes
    -----
    ``forward(x, locations)``: ``x`` is ``(B, in_channels, D, H, W)``,
    ``locations`` is ``(B, location_dim)``; returns ``(B, out_channels, D', H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        experts: int = 8,
        location_dim: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.experts = experts
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.empty(experts, out_channels)) if bias else None
        self.router = nn.Linear(location_dim, experts)
        fan_in = in_channels * k**3
        bound = 1 / math.sqrt(fan_in)
        for expert in self.weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def routing(self, locations: torch.Tensor) -> torch.Tensor:
        """Expert weights :math:`r(l)`, shape ``(B, experts)``, each in (0, 1)."""
        return torch.sigmoid(self.router(locations))

    def kernels(self, locations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels ``(B, out, in, k, k, k)`` and biases ``(B, out)``."""
        r = self.routing(locations).to(self.weight.dtype)
        weight = torch.einsum("bk,koicde->boicde", r, self.weight)
        bias = None if self.bias is None else r @ self.bias
        return weight, bias

    def forward(self, x: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        out_voxels = math.prod(
            (n + 2 * self.padding - self.kernel_size) // self.stride + 1 for n in x.shape[2:]
        )
        if out_voxels <= self.experts:
            return self._mix_outputs(x, locations)
        return self._mix_kernels(x, locations)

    def _mix_outputs(self, x: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        r"""Every expert on every sample, outputs mixed: cheaper when outputs are few voxels.

        By linearity :math:`W(l) * x = \sum_k r_k(l) (W_k * x)`; this avoids building a
        kernel per sample, which in the deep layers of a small patch costs more than
        convolving with all experts.
        """
        b, k = x.shape[0], self.experts
        y = F.conv3d(
            x,
            self.weight.reshape(k * self.out_channels, *self.weight.shape[2:]),
            None if self.bias is None else self.bias.reshape(-1),
            stride=self.stride,
            padding=self.padding,
        )
        y = y.reshape(b, k, self.out_channels, *y.shape[2:])
        r = self.routing(locations).to(y.dtype)
        return torch.einsum("bk,bko...->bo...", r, y)

    def _mix_kernels(self, x: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """One kernel per sample, the batch as a grouped convolution."""
        b = x.shape[0]
        weight, bias = self.kernels(locations)
        k = self.kernel_size
        y = F.conv3d(
            x.reshape(1, b * self.in_channels, *x.shape[2:]),
            weight.reshape(b * self.out_channels, self.in_channels, k, k, k),
            None if bias is None else bias.reshape(-1),
            stride=self.stride,
            padding=self.padding,
            groups=b,
        )
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, experts={self.experts}"
        )
