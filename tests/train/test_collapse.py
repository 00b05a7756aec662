from __future__ import annotations

import math

import pytest
import torch

from napari_fewlabel.train.collapse import effective_rank


def _with_spectrum(singular: list[float], n: int = 50, d: int = 10) -> torch.Tensor:
    """An (n, d) matrix whose centred version has exactly these singular values."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, len(singular), generator=g, dtype=torch.float64)
    u = u - u.mean(0)  # orthogonal to the ones vector, so centring leaves it alone
    u, _ = torch.linalg.qr(u)
    v, _ = torch.linalg.qr(torch.randn(d, len(singular), generator=g, dtype=torch.float64))
    offset = torch.randn(1, d, generator=g, dtype=torch.float64)  # a mean the centring removes
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T + offset


def test_flat_spectrum_gives_the_number_of_directions():
    assert effective_rank(_with_spectrum([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0, rel=1e-9)


def test_known_uneven_spectrum():
    p = torch.tensor([3.0, 1.0], dtype=torch.float64) / 4
    expected = math.exp(-float((p * p.log()).sum()))  # 1.7548...
    assert effective_rank(_with_spectrum([3.0, 1.0])) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(1.7548, abs=1e-4)


def test_one_direction_and_identical_rows_give_one():
    assert effective_rank(_with_spectrum([5.0])) == pytest.approx(1.0, rel=1e-9)
    assert effective_rank(torch.ones(8, 3)) == 1.0


def test_refuses_a_single_row():
    with pytest.raises(ValueError):
        effective_rank(torch.randn(1, 5))
