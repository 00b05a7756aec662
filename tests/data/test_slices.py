from __future__ import annotations

import numpy as np
import pytest

from napari_fewlabel.data.slices import (
    check_empty_slices,
    check_one_axis,
    corrected_slices,
    infer_slice_axis,
    labelled_slices,
    unlabelled_slices,
)
from napari_fewlabel.errors import FewLabelError


def _blob_volume(shape=(20, 30, 40)):
    """A solid structure filling the middle of the volume, as full ground truth."""
    truth = np.zeros(shape, dtype=np.uint8)
    truth[3:17, 5:25, 8:32] = 1
    truth[6:14, 10:20, 12:20] = 2
    return truth


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_painting_a_few_slices_along_any_axis_is_recognised(axis):
    truth = _blob_volume()
    painted = np.zeros_like(truth)
    picks = {0: [5, 9, 13], 1: [8, 15, 21], 2: [10, 18, 27]}[axis]
    index = [slice(None)] * 3
    index[axis] = picks
    painted[tuple(index)] = truth[tuple(index)]
    np.testing.assert_array_equal(labelled_slices(painted, axis), picks)
    assert len(unlabelled_slices(painted, axis)) == truth.shape[axis] - 3
    choice = infer_slice_axis(painted)
    assert choice.axis == axis
    assert "3 groups" in choice.reason


def test_one_labelled_slice_gives_its_axis():
    truth = _blob_volume()
    painted = np.zeros_like(truth)
    painted[:, 12] = truth[:, 12]
    assert infer_slice_axis(painted).axis == 1


def test_adjacent_labelled_slices_still_give_the_thin_axis():
    truth = _blob_volume()
    painted = np.zeros_like(truth)
    painted[8:11] = truth[8:11]
    choice = infer_slice_axis(painted)
    assert choice.axis == 0
    assert "fewest" in choice.reason


def test_a_slice_of_zeros_is_unlabelled():
    painted = np.zeros((5, 4, 4), dtype=np.int16)
    painted[2, 0, 0] = 3
    np.testing.assert_array_equal(labelled_slices(painted, 0), [2])
    np.testing.assert_array_equal(unlabelled_slices(painted, 0), [0, 1, 3, 4])


def test_no_label_at_all_is_a_user_error():
    with pytest.raises(FewLabelError, match="Paint at least one slice"):
        infer_slice_axis(np.zeros((4, 4, 4)))


def test_bad_axis_is_a_user_error():
    with pytest.raises(FewLabelError, match="0, 1 or 2"):
        labelled_slices(np.zeros((4, 4, 4)), 3)


def test_slices_marked_empty_are_checked_against_the_paint():
    truth = _blob_volume()
    painted = np.zeros_like(truth)
    painted[:, 12] = truth[:, 12]  # one coronal slice
    # Sorted, duplicates dropped; a slice on the other axis may hold paint seen across.
    np.testing.assert_array_equal(check_empty_slices(painted, 1, [29, 0, 29]), [0, 29])
    with pytest.raises(FewLabelError, match=r"Slice\(s\) 12 along y \(coronal\) are marked empty"):
        check_empty_slices(painted, 1, [0, 12])
    with pytest.raises(FewLabelError, match=r"outside the scan \(0..29"):
        check_empty_slices(painted, 1, [30])
    with pytest.raises(FewLabelError, match="outside"):
        check_empty_slices(painted, 1, [-1])
    assert check_empty_slices(painted, 0, []).size == 0


def test_labels_painted_along_two_axes_are_refused_with_both_named():
    labels = np.zeros((30, 40, 50), dtype=np.int64)
    labels[10, 5:20, 5:30] = 1
    labels[20, 8:22, 6:28] = 1
    check_one_axis(labels, 0)  # axial slices only: fine
    labels[2:28, 30, 10:20] = 2  # and one coronal slice
    for axis in (0, 1):
        with pytest.raises(FewLabelError, match="painted along two axes") as info:
            check_one_axis(labels, axis)
        assert "z (axial)" in str(info.value) and "y (coronal)" in str(info.value)


def test_corrected_slices_are_the_slices_that_changed():
    before = np.zeros((10, 12, 14), np.uint8)
    after = before.copy()
    after[3, 2:6, 2:6] = 1  # a blob brushed on axial slice 3
    after[7, 5:9, 1:4] = 2  # and one on slice 7
    assert corrected_slices(before, after, axis=0).tolist() == [3, 7]
    assert corrected_slices(before, before, axis=0).size == 0


def test_a_correction_drawn_in_another_orientation_is_refused():
    before = np.zeros((10, 12, 14), np.uint8)
    after = before.copy()
    after[2:8, 6, 3:9] = 1  # brushed on coronal slice 6, across six axial slices
    with pytest.raises(FewLabelError, match="y \\(coronal\\) slice 6, across 6 z \\(axial\\)"):
        corrected_slices(before, after, axis=0)
    assert corrected_slices(before, after, axis=1).tolist() == [6]
    with pytest.raises(FewLabelError, match="predict again"):
        corrected_slices(before, after[:5], axis=0)
