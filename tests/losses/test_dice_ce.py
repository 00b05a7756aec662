from __future__ import annotations

import math

import pytest
import torch

from napari_fewlabel.losses.dice_ce import IGNORE_INDEX, class_weights, dice_ce_loss


def _two_pixels() -> torch.Tensor:
    """Pixel 0: logits (0, 0) -> p = (.5, .5); pixel 1: (0, ln 3) -> p = (.25, .75)."""
    return torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # (1, 2, 1, 2)


def test_matches_hand_computed_value():
    loss, parts = dice_ce_loss(_two_pixels(), torch.tensor([[[0, 1]]]))
    ce = (-math.log(0.5) - math.log(0.75)) / 2  # 0.490415
    dice = (2 * 0.75) / (1.25 + 1.0)  # foreground: p1 = (.5, .75), truth (0, 1)
    assert parts["ce"] == pytest.approx(ce, abs=1e-6)
    assert parts["dice"] == pytest.approx(dice, abs=1e-5)
    assert float(loss) == pytest.approx(ce + 1 - dice, abs=1e-5)  # 0.823748


def test_ignored_pixels_do_not_count():
    loss, _ = dice_ce_loss(_two_pixels(), torch.tensor([[[IGNORE_INDEX, 1]]]))
    ce = -math.log(0.75)
    dice = 2 * 0.75 / (0.75 + 1.0)
    assert float(loss) == pytest.approx(ce + 1 - dice, abs=1e-5)  # 0.430539


def test_classes_absent_from_the_batch_are_left_to_cross_entropy():
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]], [[5.0, 5.0]]]])  # class 2 absent
    p = logits.softmax(1)[0, :, 0]
    loss, _ = dice_ce_loss(logits, torch.tensor([[[0, 1]]]))
    ce = (-math.log(p[0, 0]) - math.log(p[1, 1])) / 2
    dice1 = 2 * p[1, 1] / (p[1].sum() + 1)
    assert float(loss) == pytest.approx(float(ce + 1 - dice1), abs=1e-5)


def test_background_only_batch_is_cross_entropy_alone():
    loss, parts = dice_ce_loss(_two_pixels(), torch.tensor([[[0, 0]]]))
    assert float(loss) == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2, abs=1e-6)
    assert math.isnan(parts["dice"])


def test_nothing_labelled_gives_zero_with_a_gradient_path():
    logits = _two_pixels().requires_grad_()
    loss, _ = dice_ce_loss(logits, torch.full((1, 1, 2), IGNORE_INDEX))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_perfect_prediction_has_near_zero_loss():
    target = torch.tensor([[[0, 1, 2, 1]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    loss, parts = dice_ce_loss(logits, target)
    assert float(loss) < 1e-4
    assert parts["dice"] == pytest.approx(1.0, abs=1e-5)


def test_class_weights_are_inverse_powers_of_the_labelled_shares():
    counts = torch.tensor([[96.0, 4.0, 0.0], [0.0, 0.0, 0.0]])  # class 2 absent; an empty slice
    weights = class_weights(counts, 0.5)
    # f = (.96, .04, 0): w ~ f^-0.5, scaled so the rarest present class weighs 1
    assert weights[0].tolist() == pytest.approx([math.sqrt(0.04 / 0.96), 1.0, 0.0], abs=1e-6)
    assert weights[1].tolist() == [0.0, 0.0, 0.0]
    assert class_weights(counts, 1.0)[0, 0] == pytest.approx(0.04 / 0.96, abs=1e-6)


def test_class_balance_matches_a_hand_weighted_cross_entropy():
    logits, target = _two_pixels(), torch.tensor([[[0, 1]]])
    loss, parts = dice_ce_loss(logits, target, class_balance=0.5)
    # one pixel of each class: equal shares, equal weights, the plain value
    assert float(loss) == pytest.approx(0.823748, abs=1e-5)
    target = torch.tensor([[[0, 0, 0, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, 3] = math.log(3.0)  # p(class 1) = 0.75 on pixel 3, 0.5 elsewhere
    _, parts = dice_ce_loss(logits, target, class_balance=1.0)
    # w = f^-1 = (4/3, 4) -> CE = (3 * 4/3 * ln 2 + 4 * -ln .75) / (3 * 4/3 + 4)
    expected = (4 * math.log(2) - 4 * math.log(0.75)) / 8
    assert parts["ce"] == pytest.approx(expected, abs=1e-6)


def test_class_balance_gives_a_rare_class_a_stronger_gradient():
    """The point of the weights: a structure of 1 % of the pixels, predicted as background."""
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, 4, 4] = 1
    logits = torch.zeros(1, 2, 10, 10)
    logits[:, 0] = 4.0  # confident background everywhere
    grads = []
    for balance in (0.0, 0.5):
        x = logits.clone().requires_grad_()
        loss, _ = dice_ce_loss(x, target, class_balance=balance)
        loss.backward()
        grads.append(float(-x.grad[0, 1, 4, 4]))  # push towards class 1 at its pixel
    assert grads[1] > 2 * grads[0] > 0


def test_a_background_only_slice_keeps_its_plain_cross_entropy():
    """Per-slice balance: a slice marked empty still says "nothing here" with full weight."""
    logits = torch.randn(2, 3, 4, 4)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 1, 1] = 2  # slice 0 holds a structure, slice 1 is background only
    _, parts = dice_ce_loss(logits, target, class_balance=0.5)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    w = torch.where(target[0] == 2, 1.0, math.sqrt(1 / 15))
    slice0 = float((w * nll[0]).sum() / w.sum())
    slice1 = float(nll[1].mean())  # plain mean: background is its only class
    assert parts["ce"] == pytest.approx((slice0 + slice1) / 2, abs=1e-5)
