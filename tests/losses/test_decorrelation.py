from __future__ import annotations

import pytest
import torch

from napari_fewlabel.losses.decorrelation import off_diagonal_correlation_penalty


def _off_diagonal_covariance(z: torch.Tensor) -> float:
    """Mean absolute off-diagonal entry of the covariance of standardised columns."""
    z = (z - z.mean(0)) / z.std(0)
    cov = z.T @ z / (z.shape[0] - 1)
    d = cov.shape[0]
    return float((cov - torch.diag(torch.diagonal(cov))).abs().sum() / (d * (d - 1)))


def test_zero_for_uncorrelated_and_one_for_identical_dimensions():
    # Orthogonal, centred columns: exactly uncorrelated.
    q, _ = torch.linalg.qr(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    centred = q - q.mean(0)
    q, _ = torch.linalg.qr(centred)
    assert float(off_diagonal_correlation_penalty(q)) == pytest.approx(0.0, abs=1e-6)
    column = torch.randn(64, 1)
    same = column * torch.tensor([[1.0, 2.0, -3.0, 0.5]])
    assert float(off_diagonal_correlation_penalty(same)) == pytest.approx(1.0, abs=1e-3)


def test_penalty_ignores_the_scale_of_the_features():
    z = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    z[:, 1] += z[:, 0]
    a = off_diagonal_correlation_penalty(z)
    assert float(off_diagonal_correlation_penalty(10 * z)) == pytest.approx(float(a), rel=1e-4)


def test_minimising_it_lowers_the_off_diagonal_covariance():
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(128, 1, generator=g)
    z = (shared + 0.3 * torch.randn(128, 16, generator=g)).requires_grad_()
    before = _off_diagonal_covariance(z.detach())
    optimizer = torch.optim.Adam([z], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        off_diagonal_correlation_penalty(z).backward()
        optimizer.step()
    after = _off_diagonal_covariance(z.detach())
    assert before > 0.8
    assert after < 0.1 * before
    assert float(z.detach().std(0).min()) > 0.1  # decorrelated, not shrunk to nothing


def test_refuses_a_single_sample():
    with pytest.raises(ValueError, match="2 samples"):
        off_diagonal_correlation_penalty(torch.randn(1, 4))
