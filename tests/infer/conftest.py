from __future__ import annotations

from collections.abc import Callable

import pytest

from napari_fewlabel.models.checkpoint import SegmentationModel
from tiny_model import make_model


@pytest.fixture
def model() -> SegmentationModel:
    return make_model()


@pytest.fixture
def model_factory() -> Callable[..., SegmentationModel]:
    return make_model
