from __future__ import annotations

import math

import pytest
import torch

from napari_fewlabel.losses.cross_pseudo_supervision import (
    cross_pseudo_supervision_loss,
    sigmoid_rampup,
)


def _streams():
    """Two pixels, two classes.

    stream 1: a (0, ln 3) -> p (.25, .75), label 1; b (ln 4, 0) -> p (.8, .2), label 0
    stream 2: a (ln 2, 0) -> p (2/3, 1/3), label 0; b (0, ln 9) -> p (.1, .9), label 1
    """
    z1 = torch.tensor([[[[0.0, math.log(4.0)]], [[math.log(3.0), 0.0]]]])
    z2 = torch.tensor([[[[math.log(2.0), 0.0]], [[0.0, math.log(9.0)]]]])
    return z1, z2


def test_matches_hand_computed_value():
    z1, z2 = _streams()
    loss, parts = cross_pseudo_supervision_loss(z1, z2)
    ce_1_on_2 = (-math.log(0.25) - math.log(0.2)) / 2  # stream 1 learns labels (0, 1)
    ce_2_on_1 = (-math.log(1 / 3) - math.log(0.1)) / 2  # stream 2 learns labels (1, 0)
    assert float(loss) == pytest.approx(ce_1_on_2 + ce_2_on_1, abs=1e-5)  # 3.198465
    assert parts["cps_kept"] == 1.0


def test_threshold_keeps_only_confident_pseudo_labels():
    z1, z2 = _streams()
    loss, parts = cross_pseudo_supervision_loss(z1, z2, threshold=0.85)
    # Only stream 2's pixel b (p = .9) is confident: stream 1 learns label 1 there.
    assert float(loss) == pytest.approx(-math.log(0.2) / 2, abs=1e-5)  # 0.804719
    assert parts["cps_kept"] == pytest.approx(0.25)


def test_no_gradient_flows_through_the_pseudo_labels():
    z1, z2 = (t.clone().requires_grad_() for t in _streams())
    t1, t2 = (t.clone().requires_grad_() for t in _streams())
    loss, _ = cross_pseudo_supervision_loss(z1, z2, teacher_1=t1, teacher_2=t2)
    loss.backward()
    assert t1.grad is None and t2.grad is None
    assert z1.grad is not None and z2.grad is not None


def test_teacher_views_give_the_pseudo_labels():
    z1, z2 = _streams()
    # Teachers that agree with the students' own argmax: each stream learns its own labels.
    loss, _ = cross_pseudo_supervision_loss(z1, z2, teacher_1=z2, teacher_2=z1)
    expected = (-math.log(0.75) - math.log(0.8)) / 2 + (-math.log(2 / 3) - math.log(0.9)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(-1, 10) == 0.0
    values = [sigmoid_rampup(s, 20) for s in range(21)]
    assert values == sorted(values)
