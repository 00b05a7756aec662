from __future__ import annotations

import numpy as np
import pytest

from napari_fewlabel.data.normalization import (
    NormalizationConfig,
    count_nonfinite,
    fit_intensity,
)
from napari_fewlabel.errors import FewLabelError


def test_ct_window_maps_to_minus_one_one_and_clips():
    config = NormalizationConfig.for_modality("CT", window_hu=(-200.0, 200.0))
    mapping = fit_intensity(np.zeros((2, 2, 2), np.int16), config)
    out = mapping(np.array([-1000, -200, 0, 200, 3000], dtype=np.int16))
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1])
    assert out.dtype == np.float32
    assert mapping.background == pytest.approx(-1.0)


def test_mr_percentile_clip_then_zscore():
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 100.0, size=(20, 40, 40)).astype(np.float32)
    volume[0, 0, :5] = 1e6  # a few hot voxels must not set the scale
    config = NormalizationConfig.for_modality("MR")
    assert config.method == "percentile_zscore"
    mapping = fit_intensity(volume, config)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    assert mapping.low == pytest.approx(lo, rel=1e-3)
    assert mapping.high == pytest.approx(hi, rel=1e-3)
    out = mapping(volume)
    assert out.mean() == pytest.approx(0.0, abs=1e-3)
    assert out.std() == pytest.approx(1.0, abs=1e-3)
    assert out.max() == pytest.approx((hi - mapping.offset) / mapping.scale, rel=1e-4)


def test_large_volumes_are_fitted_on_a_subsample_with_nearly_the_same_result():
    rng = np.random.default_rng(1)
    volume = rng.normal(300, 50, size=(160, 160, 160)).astype(np.float32)  # 4.1 M voxels
    full = np.percentile(volume, [0.5, 99.5])
    mapping = fit_intensity(volume, NormalizationConfig("percentile_zscore"))
    assert mapping.low == pytest.approx(full[0], rel=0.01)
    assert mapping.high == pytest.approx(full[1], rel=0.01)


def test_nan_and_inf_become_the_window_ends_and_are_counted():
    volume = np.full((3, 4, 4), 100.0, dtype=np.float32)
    volume[0, 0, 0] = np.nan
    volume[1, 1, 1] = np.inf
    volume[2, 2, 2] = -np.inf
    assert count_nonfinite(volume) == 3
    assert count_nonfinite(np.zeros((2, 2, 2), np.int16)) == 0
    mapping = fit_intensity(volume, NormalizationConfig("ct_window", window_hu=(0.0, 200.0)))
    out = mapping(volume)
    assert np.all(np.isfinite(out))
    assert out[0, 0, 0] == -1 and out[1, 1, 1] == 1 and out[2, 2, 2] == -1


def test_all_nan_volume_is_a_user_error():
    with pytest.raises(FewLabelError, match="no finite voxel"):
        fit_intensity(np.full((2, 2, 2), np.nan), NormalizationConfig("percentile_zscore"))


def test_config_round_trip_and_validation():
    for config in (NormalizationConfig.for_modality("CT"), NormalizationConfig.for_modality("MR")):
        assert NormalizationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(FewLabelError, match="empty"):
        NormalizationConfig("ct_window", window_hu=(100.0, -100.0))
    with pytest.raises(FewLabelError, match="Unknown normalisation"):
        NormalizationConfig("minmax")  # type: ignore[arg-type]
