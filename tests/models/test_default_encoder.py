"""The shipped encoders and the registry's default for fine-tuning."""

from __future__ import annotations

import pytest
import torch

from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models import registry
from napari_fewlabel.models.checkpoint import (
    ENCODER_ONLY_KEY,
    ModelCard,
    is_encoder_only,
    load_checkpoint,
    load_encoder_weights,
    read_card,
    save_checkpoint,
    save_encoder_checkpoint,
)
from napari_fewlabel.models.unet2d import Encoder, TwoStreamUNet, UNetConfig

SHIPPED = sorted(registry.SHIPPED_MODEL_DIR.glob("*-encoder.safetensors"))


def _card(modality="MR", encoder_only=True) -> ModelCard:
    arch = UNetConfig(widths=(8, 16), full_res_width=4).to_dict()
    if encoder_only:
        arch[ENCODER_ONLY_KEY] = True
    return ModelCard(
        architecture=arch,
        classes=default_classes(2),
        modality=modality,
        normalization=NormalizationConfig.for_modality(modality),
        input_size=(64, 64),
    )


@pytest.fixture
def folders(tmp_path, monkeypatch):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setattr(registry, "user_model_dir", lambda: user)
    monkeypatch.setattr(registry, "SHIPPED_MODEL_DIR", shipped)
    return user, shipped


def test_default_encoder_serves_the_modalities_it_was_pretrained_on(folders):
    _, shipped = folders
    assert registry.default_encoder("MR") is None  # nothing shipped
    encoder = Encoder(UNetConfig(widths=(8, 16), full_res_width=4))
    path = shipped / f"{registry.DEFAULT_ENCODER}.safetensors"
    # Pretrained on MR and CT (each scan normalised by its own modality): serves both.
    save_encoder_checkpoint(path, encoder, _card("unknown"))
    assert registry.default_encoder("MR") == path
    assert registry.default_encoder("CT") == path
    # Pretrained on MR only: not offered for CT.
    save_encoder_checkpoint(path, encoder, _card("MR"))
    assert registry.default_encoder("MR") == path
    assert registry.default_encoder("unknown") == path
    assert registry.default_encoder("CT") is None


def test_a_segmentation_model_under_the_default_name_is_not_an_encoder(folders):
    _, shipped = folders
    card = _card(encoder_only=False)
    network = TwoStreamUNet(UNetConfig.from_dict(card.architecture))
    save_checkpoint(shipped / f"{registry.DEFAULT_ENCODER}.safetensors", network, card)
    assert registry.default_encoder("MR") is None


@pytest.mark.skipif(not SHIPPED, reason="no shipped encoders in models/weights/")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_encoders_load_into_the_default_finetuning_network(path):
    card = read_card(path)
    assert is_encoder_only(card)
    assert UNetConfig.from_dict(card.architecture) == UNetConfig()
    for key in ("method", "data", "steps_done", "hardware", "date", "effective_rank"):
        assert card.training[key], key
    scans = " ".join(s["path"] for s in card.training["data"]["scans"])
    assert "mni_icbm152" not in scans  # never the benchmark's evaluation volume
    network = TwoStreamUNet(UNetConfig())
    before = network.encoder.stem[0].weight.clone()
    load_encoder_weights(network, path)
    assert network.encoder.stem[0].weight.dtype == torch.float32
    assert not torch.equal(before, network.encoder.stem[0].weight)
    with pytest.raises(FewLabelError, match="pretrained encoder"):
        load_checkpoint(path)


def test_shipped_weights_stay_small():
    total = sum(p.stat().st_size for p in registry.SHIPPED_MODEL_DIR.glob("*.safetensors"))
    assert total <= 20 * 2**20
