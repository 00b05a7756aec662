from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from napari_fewlabel.data import normalization
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer import predict as predict_module
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io.volume import Volume


def _volume(shape=(6, 32, 24), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume.from_array(rng.gamma(2, 50, size=shape).astype(np.float32), modality="MR")


def test_labels_have_the_volume_shape_and_a_small_dtype(model):
    volume = _volume()
    labels = predict_volume(model, volume, device="cpu")
    assert labels.shape == volume.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_each_slice_is_the_argmax_of_the_mean_softmax(model):
    volume = _volume(shape=(5, 32, 32))
    labels = predict_volume(model, volume, device="cpu")
    mapping = normalization.fit_intensity(volume.array, model.card.normalization)
    x = torch.from_numpy(mapping(volume.array[1:4]))[None]  # window around slice 2
    with torch.no_grad():
        expected = model.network.predict_proba(x).argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels[2], expected)


def test_batch_size_does_not_change_the_result(model):
    volume = _volume(shape=(7, 32, 24))
    one = predict_volume(model, volume, batch_size=1, device="cpu")
    many = predict_volume(model, volume, batch_size=5, device="cpu")
    np.testing.assert_array_equal(one, many)


def test_other_slice_axis_matches_a_transposed_volume(model_factory):
    volume = _volume(shape=(20, 6, 24))
    model = model_factory(slice_axis=1)
    along_y = predict_volume(model, volume, device="cpu")  # axis from the card
    transposed = Volume.from_array(volume.array.transpose(1, 0, 2).copy(), modality="MR")
    along_z = predict_volume(model, transposed, axis=0, device="cpu")
    np.testing.assert_array_equal(along_y, along_z.transpose(1, 0, 2))


def test_slices_larger_than_the_input_are_shrunk_and_mapped_back(model_factory):
    model = model_factory(input_size=(32, 32))
    volume = _volume(shape=(3, 90, 70))
    labels = predict_volume(model, volume, device="cpu")
    assert labels.shape == (3, 90, 70)


def test_flip_tta_defaults_to_the_model_card(model_factory, monkeypatch):
    seen = []
    real = predict_module._probabilities

    def spy(network, x, flips):
        seen.append(flips)
        return real(network, x, flips)

    monkeypatch.setattr(predict_module, "_probabilities", spy)
    volume = _volume(shape=(2, 32, 32))
    predict_volume(model_factory(flips=True), volume, device="cpu")
    predict_volume(model_factory(flips=True), volume, device="cpu", test_time_flips=False)
    assert seen == [True, False]


def test_flip_tta_averages_three_views(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tta = predict_module._probabilities(model.network, x, True)
        plain = model.network.predict_proba(x)
        lr = model.network.predict_proba(x.flip(3)).flip(3)
        ud = model.network.predict_proba(x.flip(2)).flip(2)
    torch.testing.assert_close(tta, (plain + lr + ud) / 3)


def test_memory_stays_bounded_by_normalising_one_batch_at_a_time(model, monkeypatch):
    sizes = []
    real_call = normalization.IntensityMapping.__call__

    def spy(self, values):
        sizes.append(np.asarray(values).size)
        return real_call(self, values)

    monkeypatch.setattr(normalization.IntensityMapping, "__call__", spy)
    volume = _volume(shape=(40, 32, 32))
    predict_volume(model, volume, batch_size=4, device="cpu")
    assert max(sizes) == (4 + 2) * 32 * 32  # one batch plus its two neighbouring slices


def test_nan_voxels_are_logged_and_predicted(model, caplog):
    array = _volume().array.copy()
    array[0, :5, :5] = np.nan
    with caplog.at_level(logging.WARNING):
        labels = predict_volume(model, Volume.from_array(array, modality="MR"), device="cpu")
    assert "25 NaN/Inf voxels" in caplog.text
    assert labels.shape == array.shape


def test_many_classes_give_uint16_labels(model_factory):
    model = model_factory(num_classes=300, in_slices=1)
    labels = predict_volume(model, _volume(shape=(2, 32, 32)), device="cpu")
    assert labels.dtype == np.uint16


def test_bad_arguments_are_user_errors(model):
    with pytest.raises(FewLabelError, match="0, 1 or 2"):
        predict_volume(model, _volume(), axis=3)
    with pytest.raises(FewLabelError, match="batch_size"):
        predict_volume(model, _volume(), batch_size=0)
    with pytest.raises(FewLabelError, match="NaN or Inf"):
        predict_volume(model, Volume.from_array(np.full((2, 8, 8), np.nan)), device="cpu")


def _with_planes(model, planes):
    from dataclasses import replace

    from napari_fewlabel.models.checkpoint import SegmentationModel

    card = replace(model.card, inference={**model.card.inference, "planes": planes})
    return SegmentationModel(model.network, card)


def _plane_probabilities(model, volume: Volume, plane: int) -> np.ndarray:
    """Mean-of-streams softmax of every slice along ``plane``, written out by hand: ``(K, z, y, x)``.

    Isotropic voxels and slices smaller than the input: no resizing, only padding.
    """
    mapping = normalization.fit_intensity(volume.array, model.card.normalization)
    moved = np.moveaxis(mapping(volume.array), plane, 0)
    n, h, w = moved.shape
    divisor = model.network.config.size_divisor
    if plane == model.card.slice_axis:
        size = model.card.input_size
    else:  # square pixels already: the resampled slice is the slice, padded to the divisor
        size = (h + (-h) % divisor, w + (-w) % divisor)
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    out = np.zeros((len(model.card.classes), n, h, w), dtype=np.float32)
    for i in range(n):
        window = moved[np.clip([i - 1, i, i + 1], 0, n - 1)]
        x = np.full((1, 3, *size), mapping.background, dtype=np.float32)
        x[0, :, top : top + h, left : left + w] = window
        with torch.no_grad():
            proba = model.network.predict_proba(torch.from_numpy(x))[0].numpy()
        out[:, i] = proba[:, top : top + h, left : left + w]
    return np.moveaxis(out, 1, plane + 1)


def test_a_three_plane_model_predicts_the_argmax_of_the_planes_mean(model):
    volume = _volume(shape=(12, 20, 16))  # 1 mm voxels: the planes across need no resizing
    three = _with_planes(model, [0, 1, 2])
    labels = predict_volume(three, volume, device="cpu")
    mean = sum(_plane_probabilities(model, volume, p) for p in (0, 1, 2)) / 3
    expected = mean.argmax(axis=0)
    # the sum is kept as bytes: only near-ties may differ
    assert np.mean(labels == expected) > 0.99
    close = np.sort(mean, axis=0)[-1] - np.sort(mean, axis=0)[-2] < 0.02
    assert np.all((labels == expected) | close)
    # and it is not the labelled plane's answer alone
    assert not np.array_equal(labels, predict_volume(model, volume, device="cpu"))


def test_a_thin_scan_is_predicted_along_the_labelled_plane_only(model):
    volume = _volume(shape=(5, 32, 24))
    three = _with_planes(model, [0, 1, 2])
    np.testing.assert_array_equal(
        predict_volume(three, volume, device="cpu"), predict_volume(model, volume, device="cpu")
    )


def _run_steps(steps):
    from napari_fewlabel.infer.predict import run_to_end

    counts = []
    labels = run_to_end(steps, lambda done, total: counts.append((done, total)))
    return counts, labels


def test_the_steps_count_every_planes_slices_and_return_the_same_labels(model):
    from napari_fewlabel.infer.predict import predict_volume_steps

    volume = _volume(shape=(12, 20, 16))
    one_plane, labels = _run_steps(predict_volume_steps(model, volume, batch_size=5, device="cpu"))
    assert one_plane == [(5, 12), (10, 12), (12, 12)]
    np.testing.assert_array_equal(labels, predict_volume(model, volume, device="cpu"))
    three = _with_planes(model, [0, 1, 2])
    counts, labels = _run_steps(predict_volume_steps(three, volume, batch_size=8, device="cpu"))
    done = [d for d, _ in counts]
    assert {t for _, t in counts} == {12 + 20 + 16}  # every plane's slices, once
    assert done == sorted(done) and done[-1] == 48
    np.testing.assert_array_equal(labels, predict_volume(three, volume, device="cpu"))
