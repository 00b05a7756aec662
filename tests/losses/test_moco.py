from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_fewlabel.losses.moco import KeyQueue, moco_infonce


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_matches_the_formula_with_batch_and_queue_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    queue = torch.tensor([[-1.0, 0.0]])
    tau = 0.2
    loss = moco_infonce(q, k, queue, temperature=tau)
    expected = 0.0
    for i in range(2):
        logits = torch.cat([q[i] @ k.T, q[i] @ queue.T]) / tau
        expected += -float(logits[i] - torch.logsumexp(logits, 0)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_true_keys_beat_shuffled_keys_and_no_gradient_reaches_keys_or_queue():
    q = _unit(16, 32).requires_grad_()
    keys = F.normalize(q.detach() + 0.05 * _unit(16, 32, seed=1), dim=-1).requires_grad_()
    queue = _unit(64, 32, seed=2).requires_grad_()
    true_loss = moco_infonce(q, keys, queue, temperature=0.2)
    shuffled = moco_infonce(q, keys.roll(1, 0), queue, temperature=0.2)
    assert float(true_loss.detach()) < 1.0 < math.log(80) - 1 < float(shuffled.detach())
    true_loss.backward()
    assert q.grad is not None and keys.grad is None and queue.grad is None


def test_queue_is_first_in_first_out_and_wraps_around():
    queue = KeyQueue(size=5, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 4)]  # keys 1,1 2,2 3,3
    for b in batches:
        queue.enqueue(b)
    assert int(queue.keys_seen) == 6
    assert int(queue.pointer) == 1
    # Row 0 was overwritten by the second key of batch 3; rows 1-4 hold 1, 2, 2, 3.
    assert queue.keys[:, 0].tolist() == [3.0, 1.0, 2.0, 2.0, 3.0]


def test_a_batch_larger_than_the_queue_keeps_its_last_keys():
    queue = KeyQueue(size=3, dim=1)
    queue.enqueue(torch.arange(7, dtype=torch.float32)[:, None])
    assert sorted(queue.keys[:, 0].tolist()) == [4.0, 5.0, 6.0]
    assert int(queue.keys_seen) == 3


def test_queue_starts_with_unit_random_keys_and_saves_its_state():
    queue = KeyQueue(size=8, dim=4)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(8))
    queue.enqueue(_unit(3, 4))
    restored = KeyQueue(size=8, dim=4)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys)
    assert int(restored.pointer) == 3 and int(restored.keys_seen) == 3
