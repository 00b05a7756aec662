"""InVesalius projects: the real head CT from Debian's invesalius-examples."""

from __future__ import annotations

import numpy as np
import pytest

import real_data
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume
from napari_fewlabel.io.invesalius import read_invesalius_masks


def test_head_ct_reads_in_hu_with_its_spacing():
    scan = load_volume(real_data.invesalius_head_ct())
    assert scan.modality == "CT"
    assert scan.shape == (108, 256, 256)
    assert scan.spacing_mm == pytest.approx((1.5, 0.9570312, 0.9570312))
    assert scan.array.min() == -1024
    assert scan.header["format"] == "InVesalius"


def test_masks_line_up_with_the_voxels_they_were_thresholded_from():
    scan, masks = read_invesalius_masks(real_data.invesalius_head_ct())
    bone = masks["Máscara 1"]  # thresholded at 226..3071 HU in InVesalius
    assert bone.shape == scan.shape
    inside = scan.array[bone]
    assert np.mean((inside >= 226) & (inside <= 3071)) > 0.99
    # ...and the mask is not just any set of bright voxels: it covers most of them.
    assert bone[scan.array >= 226].mean() > 0.9


def test_display_puts_the_face_up_and_the_head_rest_down():
    """Anterior is row 0 in display; InVesalius stores rows the other way round."""
    scan = load_volume(real_data.invesalius_head_ct())
    mid = scan.array[54]
    # The head-rest arc reaches further out to the sides than the head: at the edge
    # columns it is the only thing there, and it must be in the lower (posterior) half.
    edge = mid[:, :30] > -300
    assert edge[128:].any()
    assert not edge[:128].any()


def test_truncated_project_is_refused(tmp_path):
    bad = tmp_path / "head.inv3"
    bad.write_bytes(real_data.invesalius_head_ct().read_bytes()[:100_000])
    with pytest.raises(FewLabelError, match="InVesalius"):
        load_volume(bad)
