from __future__ import annotations

import math

import pytest
import torch

from napari_fewlabel.losses.dice_ce import IGNORE_INDEX, dice_ce_loss


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
