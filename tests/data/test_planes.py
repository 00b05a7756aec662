"""The planes across the labelled slices: their lines are exactly the labelled voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_fewlabel.data.input_fit import InputFit, choose_input_size
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.planes import CrossPlane, in_plane_axes, line_targets, plane_fit
from napari_fewlabel.data.slice_stack import SliceStack
from napari_fewlabel.losses.dice_ce import IGNORE_INDEX, dice_ce_loss


def _main_fit(shape: tuple[int, int, int], axis: int, max_side: int = 256) -> InputFit:
    rows, cols = in_plane_axes(axis)
    slice_shape = (shape[rows], shape[cols])
    return InputFit(slice_shape, choose_input_size(slice_shape, max_side=max_side, multiple=16))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_lines_are_exactly_the_labelled_voxels(axis: int) -> None:
    """Isotropic, no resizing: the known voxels of every cross-plane slice are the labelled slices'."""
    rng = np.random.default_rng(0)
    shape = (20, 24, 28)
    labels = rng.integers(0, 4, size=shape)
    given = np.array([2, 9, 15])
    main = _main_fit(shape, axis)
    known = np.zeros(shape, dtype=bool)
    known[(slice(None),) * axis + (given,)] = True
    for plane in in_plane_axes(axis):
        fit = plane_fit(shape, (1.0, 1.0, 1.0), axis, plane, main, 4, 256)
        rows, cols = in_plane_axes(plane)
        assert fit.resized_shape == (shape[rows], shape[cols])  # square pixels already
        targets = line_targets(labels, axis, given, plane, fit).numpy()
        (hh, ww), (h, w) = fit.input_size, fit.resized_shape
        top, left = (hh - h) // 2, (ww - w) // 2
        inside = targets[:, top : top + h, left : left + w]
        # everything outside the slice (padding) is ignored
        assert (targets != IGNORE_INDEX).sum() == (inside != IGNORE_INDEX).sum()
        expected_known = np.moveaxis(known, plane, 0)
        np.testing.assert_array_equal(inside != IGNORE_INDEX, expected_known)
        np.testing.assert_array_equal(
            inside[expected_known], np.moveaxis(labels, plane, 0)[expected_known]
        )


def test_thick_slices_become_bands_and_no_labelled_slice_is_lost() -> None:
    """6 mm slices of 1 mm pixels: a labelled slice is a band of about 6 rows in a coronal slice;
    thin slices shrunk 4x along the slice axis still keep one row per labelled slice."""
    labels = np.zeros((10, 32, 32), dtype=np.int64)
    labels[4] = 2
    given = np.array([4])
    main = _main_fit(labels.shape, 0)
    fit = plane_fit(labels.shape, (6.0, 1.0, 1.0), 0, 1, main, 4, 256)
    assert fit.resized_shape == (60, 32)
    targets = line_targets(labels, 0, given, 1, fit)
    rows_known = np.flatnonzero((targets[0] != IGNORE_INDEX).any(dim=1).numpy())
    top = (fit.input_size[0] - 60) // 2
    np.testing.assert_array_equal(rows_known, np.arange(24, 30) + top)
    assert set(np.unique(targets[:, rows_known].numpy())) == {2}

    thin = np.zeros((120, 32, 32), dtype=np.int64)
    given = np.array([1, 2, 3, 60, 118])  # adjacent slices collapse onto few output rows
    thin[given] = 1
    fit = plane_fit(thin.shape, (0.25, 1.0, 1.0), 0, 2, _main_fit(thin.shape, 0), 4, 256)
    assert fit.resized_shape == (30, 32)
    targets = line_targets(thin, 0, given, 2, fit)
    rows_known = np.flatnonzero((targets[0] != IGNORE_INDEX).any(dim=1).numpy())
    assert rows_known.size >= 3  # slices 1-3 share a row; 60 and 118 have their own
    assert (targets[targets != IGNORE_INDEX] == 1).all()


def test_ignored_voxels_get_no_gradient() -> None:
    """The loss on a hand-made target: logits off the labelled line have exactly zero gradient."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE_INDEX, dtype=torch.int64)
    target[:, 3] = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1])  # one labelled row per slice
    loss, _ = dice_ce_loss(logits, target)
    loss.backward()
    assert logits.grad is not None
    grad = logits.grad.abs().sum(dim=1)  # (B, H, W)
    assert torch.all(grad[:, 3] > 0)
    off_line = torch.ones(8, dtype=torch.bool)
    off_line[3] = False
    assert torch.all(grad[:, off_line] == 0)


def test_cross_plane_batches_draw_structure_and_targets_match_slices() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 20, 24)).astype(np.float32)
    labels = np.zeros(image.shape, dtype=np.int64)
    labels[8, 5:9, 10:14] = 1  # a small structure on one labelled slice
    mapping = fit_intensity(image, NormalizationConfig.for_modality("MR"))
    main = _main_fit(image.shape, 0)
    fit = plane_fit(image.shape, (1.0, 1.0, 1.0), 0, 2, main, 4, 256)
    plane = CrossPlane(
        2,
        SliceStack(image, 2, mapping, fit.input_size, fit=fit),
        line_targets(labels, 0, np.array([8]), 2, fit),
    )
    np.testing.assert_array_equal(plane.crossing, np.arange(10, 14))
    x, y = plane.labelled_batch(8, 3, rng)
    assert x.shape == (8, 3, *fit.input_size) and y.shape == (8, *fit.input_size)
    assert y.dtype == torch.int64
    assert int((y == 1).flatten(1).any(dim=1).sum()) >= 4  # half the batch crosses it
