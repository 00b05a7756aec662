"""``fewlabel models`` lists the named models and the user's model folder."""

from __future__ import annotations

import torch

from napari_fewlabel.cli import main
from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.models import registry
from napari_fewlabel.models.checkpoint import (
    ENCODER_ONLY_KEY,
    ModelCard,
    save_checkpoint,
    save_encoder_checkpoint,
)
from napari_fewlabel.models.unet2d import Encoder, TwoStreamUNet, UNetConfig

ARCH = UNetConfig(widths=(8, 16), full_res_width=4, num_classes=3)


def _card(encoder: bool) -> ModelCard:
    arch = ARCH.to_dict()
    if encoder:
        arch[ENCODER_ONLY_KEY] = True
    return ModelCard(
        architecture=arch,
        classes=named_classes(["background", "liver", "spleen"]),
        modality="CT",
        normalization=NormalizationConfig.for_modality("CT"),
        input_size=(64, 64),
    )


def test_lists_shipped_encoders_and_user_models(tmp_path, monkeypatch, capsys):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setattr(registry, "user_model_dir", lambda: user)
    monkeypatch.setattr(registry, "SHIPPED_MODEL_DIR", shipped)

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(user) in out and "no named models yet" in out

    torch.manual_seed(0)
    save_encoder_checkpoint(
        shipped / f"{registry.DEFAULT_ENCODER}.safetensors", Encoder(ARCH), _card(True)
    )
    save_checkpoint(user / "abdomen.safetensors", TwoStreamUNet(ARCH), _card(False))
    (user / "broken.safetensors").write_bytes(b"not a model")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines[2:] if line and not line.startswith("*")}
    assert "segmentation model" in row["abdomen"] and "liver, spleen" in row["abdomen"]
    assert "user" in row["abdomen"]
    assert "pretrained encoder *" in row[registry.DEFAULT_ENCODER]
    assert "shipped" in row[registry.DEFAULT_ENCODER]
    assert "unreadable" in row["broken"]
