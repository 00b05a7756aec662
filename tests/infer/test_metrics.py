from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.metrics import class_metrics, dice_score

monai_metrics = pytest.importorskip("monai.metrics")


def _blobs(seed: int, shape=(24, 40, 36)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=3)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[field > 0.02] = 1
    labels[field > 0.06] = 2
    return labels


def _onehot(labels: np.ndarray, classes: int) -> torch.Tensor:
    t = torch.from_numpy(labels.astype(np.int64))
    return torch.nn.functional.one_hot(t, classes).permute(3, 0, 1, 2)[None].float()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.9)])
def test_agrees_with_monai(spacing):
    truth = _blobs(0)
    pred = _blobs(0)
    pred[ndimage.binary_dilation(truth == 2, iterations=1)] = 2  # grow one class
    pred[_blobs(1) == 2] = 1  # and add some false positives of the other
    ours = class_metrics(pred, truth, spacing)
    p, t = _onehot(pred, 3), _onehot(truth, 3)
    dice = monai_metrics.compute_dice(p, t, include_background=False)[0]
    hd95 = monai_metrics.compute_hausdorff_distance(
        p, t, include_background=False, percentile=95, spacing=list(spacing)
    )[0]
    asd = monai_metrics.compute_average_surface_distance(
        p, t, include_background=False, symmetric=True, spacing=list(spacing)
    )[0]
    for k, result in enumerate(ours):
        assert result.dice == pytest.approx(float(dice[k]), abs=1e-6)
        assert result.hd95_mm == pytest.approx(float(hd95[k]), rel=1e-4)
        assert result.asd_mm == pytest.approx(float(asd[k]), rel=1e-4)


def test_hand_computed_shift_in_millimetres():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    pred = np.roll(truth, 1, axis=0)  # one slice further along z, 3 mm apart
    (result,) = class_metrics(pred, truth, (3.0, 1.0, 1.0))
    assert result.dice == pytest.approx(2 * 48 / 128)
    assert result.hd95_mm == pytest.approx(3.0)
    assert result.voxels_pred == result.voxels_truth == 64


def test_empty_masks_follow_the_documented_convention():
    truth = np.zeros((4, 4, 4), np.uint8)
    pred = truth.copy()
    pred[1, 1, 1] = 1
    (missing,) = class_metrics(truth, pred, (1, 1, 1))  # class 1 only in "truth"
    assert missing.dice == 0.0 and math.isnan(missing.hd95_mm) and math.isnan(missing.asd_mm)
    results = class_metrics(truth, truth, (1, 1, 1), class_names=["bg", "liver"])
    assert [(r.name, r.dice) for r in results] == [("liver", 1.0)]
    assert dice_score(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(FewLabelError, match="same scan"):
        class_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1, 1, 1))
