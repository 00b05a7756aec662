from __future__ import annotations

import torch

from napari_fewlabel.data.input_fit import InputFit, choose_input_size


def test_input_size_is_a_multiple_and_never_upscales():
    assert choose_input_size((233, 197), max_side=256, multiple=32) == (256, 224)
    assert choose_input_size((512, 512), max_side=256, multiple=32) == (256, 256)
    assert choose_input_size((10, 20), max_side=256, multiple=32) == (32, 32)


def test_small_slice_is_padded_and_cropped_back_exactly():
    fit = InputFit((50, 40), (64, 64))
    assert fit.scale == 1.0
    images = torch.randn(2, 3, 50, 40)
    x = fit.images_to_input(images, pad_value=-5.0)
    assert x.shape == (2, 3, 64, 64)
    assert (x[:, :, 0] == -5.0).all()  # padding value above the slice
    back = fit.probabilities_from_input(x)
    torch.testing.assert_close(back, images)


def test_large_slice_is_shrunk_and_probabilities_come_back_at_full_size():
    fit = InputFit((300, 200), (128, 128))
    assert fit.resized_shape == (128, 85)
    labels = torch.zeros(1, 300, 200, dtype=torch.int64)
    labels[:, 100:200, 50:150] = 1
    small = fit.labels_to_input(labels)
    assert small.shape == (1, 128, 128) and set(small.unique().tolist()) == {0, 1}
    onehot = torch.nn.functional.one_hot(small, 2).permute(0, 3, 1, 2).float()
    back = fit.probabilities_from_input(onehot).argmax(dim=1)
    assert back.shape == (1, 300, 200)
    agreement = (back == labels).float().mean()
    assert agreement > 0.99
