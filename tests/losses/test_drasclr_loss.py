"""DrasCLR's location-specific InfoNCE and its per-location queues."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_fewlabel.losses.drasclr import (
    LocationQueues,
    location_bins,
    location_infonce,
    neighbour_query,
)


def test_matching_views_give_a_lower_loss_than_shuffled_ones():
    torch.manual_seed(0)
    keys = F.normalize(torch.randn(16, 8), dim=1)
    queries = F.normalize(keys + 0.1 * torch.randn(16, 8), dim=1)
    negatives = F.normalize(torch.randn(16, 32, 8), dim=2)
    matched = location_infonce(queries, keys, negatives, temperature=0.2)
    shuffled = location_infonce(queries, keys.roll(1, dims=0), negatives, temperature=0.2)
    assert matched < shuffled
    # The neighbour query of two views close to the key also beats a shuffled key.
    nb = neighbour_query(queries, F.normalize(keys + 0.1 * torch.randn(16, 8), dim=1))
    assert location_infonce(nb, keys, negatives) < location_infonce(nb, keys.roll(3, 0), negatives)


def test_bins_cover_the_lung_box():
    corners = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.1, -0.9, 0.9]])
    assert location_bins(corners, 3).tolist() == [0, 26, 1 * 9 + 0 * 3 + 2]


def test_each_bin_keeps_its_own_keys_first_in_first_out():
    queues = LocationQueues(bins=4, size=3, dim=2)
    before = queues.keys.clone()
    keys = F.normalize(torch.arange(10, dtype=torch.float32).reshape(5, 2) + 1, dim=1)
    queues.enqueue(keys, torch.tensor([2, 2, 0, 2, 2]))
    assert torch.equal(queues.keys[1], before[1]) and torch.equal(queues.keys[3], before[3])
    torch.testing.assert_close(queues.keys[0, 0], keys[2])
    # Four keys into a queue of three: the last three stay, the pointer wraps.
    torch.testing.assert_close(queues.keys[2], keys[[1, 3, 4]][[0, 1, 2]])
    assert queues.pointers.tolist() == [1, 0, 0, 0] and int(queues.keys_seen) == 5
    assert queues.negatives(torch.tensor([2, 0])).shape == (2, 3, 2)
