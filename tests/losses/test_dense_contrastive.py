from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_fewlabel.losses.dense_contrastive import (
    dense_infonce,
    sample_dense,
    symmetric_dense_infonce,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_true_correspondences_give_a_much_lower_loss_than_shuffled_ones():
    queries = _unit(4, 64, 32)
    keys = queries + 0.05 * _unit(4, 64, 32, seed=1)  # the same locations, slightly perturbed
    keys = F.normalize(keys, dim=-1)
    shuffled = keys[:, torch.randperm(64, generator=torch.Generator().manual_seed(2))]
    true_loss = float(dense_infonce(queries, keys, temperature=0.1))
    shuffled_loss = float(dense_infonce(queries, shuffled, temperature=0.1))
    assert true_loss < 0.1
    assert shuffled_loss > math.log(4 * 64) - 1  # no better than guessing among the N keys
    assert shuffled_loss > 30 * true_loss


def test_matches_the_formula_on_two_locations():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[0.6, 0.8], [0.0, 1.0]]])
    tau = 0.5
    s = q[0] @ k[0].T / tau
    expected = -0.5 * sum(float(s[i, i] - torch.logsumexp(s[i], 0)) for i in range(2))
    assert float(dense_infonce(q, k, temperature=tau)) == pytest.approx(expected, abs=1e-6)


def test_neighbourhood_counts_close_locations_of_the_same_image_as_positives():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])
    k = q.clone()
    # In image 0 the two locations are 0.05 apart in the source slice, in image 1 far apart.
    points = torch.tensor([[[0.0, 0.0], [0.05, 0.0]], [[0.0, 0.0], [0.05, 0.0]]])
    tau = 0.2
    loss = dense_infonce(q, k, temperature=tau, source_points=points, neighbourhood=0.1)
    s = q.reshape(4, 2) @ k.reshape(4, 2).T / tau
    # Positives: image 0 -> both of its locations; image 1 -> also both (same distances).
    positives = [[0, 1], [0, 1], [2, 3], [2, 3]]
    expected = (
        -sum(
            float(torch.logsumexp(s[i, p], 0) - torch.logsumexp(s[i], 0))
            for i, p in enumerate(positives)
        )
        / 4
    )
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(loss) < float(dense_infonce(q, k, temperature=tau))


def test_invalid_locations_are_neither_queries_nor_negatives():
    q, k = _unit(2, 8, 16), _unit(2, 8, 16, seed=3)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    garbage_q, garbage_k = q.clone(), k.clone()
    garbage_q[1, 5:] = _unit(3, 16, seed=4)
    garbage_k[1, 5:] = garbage_q[1, 5:]  # would be easy positives if they counted
    masked = dense_infonce(garbage_q, garbage_k, valid=valid)
    kept = torch.cat([q[0], q[1, :5]])[None], torch.cat([k[0], k[1, :5]])[None]
    assert float(masked) == pytest.approx(float(dense_infonce(*kept)), abs=1e-5)


def test_symmetric_loss_averages_both_directions():
    a, b = _unit(2, 16, 8), _unit(2, 16, 8, seed=5)
    both = symmetric_dense_infonce(a, b, a, b, temperature=0.2)
    expected = 0.5 * (dense_infonce(a, b, temperature=0.2) + dense_infonce(b, a, temperature=0.2))
    assert float(both) == pytest.approx(float(expected))


def test_sampling_at_pixel_centres_returns_the_pixels():
    features = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    rows, cols = torch.tensor([0, 3, 2]), torch.tensor([0, 4, 1])
    x = (2 * cols + 1) / 5 - 1
    y = (2 * rows + 1) / 4 - 1
    points = torch.stack([x, y], dim=-1)[None].repeat(2, 1, 1)
    sampled = sample_dense(features, points)
    assert sampled.shape == (2, 3, 3)
    assert torch.allclose(sampled, features[:, :, rows, cols].transpose(1, 2))
