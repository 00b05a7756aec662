from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    build_network,
    load_checkpoint,
    load_encoder_weights,
    load_optimizer_state,
    read_card,
    save_checkpoint,
)
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig

CONFIG = UNetConfig(in_slices=3, num_classes=3, widths=(8, 16), full_res_width=4)


def _card(**changes) -> ModelCard:
    fields = dict(
        architecture=CONFIG.to_dict(),
        classes=default_classes(3),
        modality="MR",
        normalization=NormalizationConfig.for_modality("MR"),
        input_size=(64, 48),
        slice_axis=1,
        training={"method": "test", "settings": {"steps": 3, "pair": (1, 2)}},
        inference={"test_time_flips": True},
    )
    fields.update(changes)
    return ModelCard(**fields)


def test_round_trip_keeps_card_and_weights_identical(tmp_path):
    torch.manual_seed(0)
    net = TwoStreamUNet(CONFIG)
    card = _card()
    path = save_checkpoint(tmp_path / "m.safetensors", net, card)
    loaded = load_checkpoint(path)
    assert loaded.card == card
    assert loaded.card.training["settings"]["pair"] == [1, 2]  # JSON form, compared equal
    original = net.state_dict()
    for name, tensor in loaded.network.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert read_card(path) == card
    assert not loaded.network.training  # ready for prediction


def test_card_json_names_the_essentials(tmp_path):
    text = _card().to_json()
    for key in ("architecture", "classes", "modality", "normalization", "input_size",
                "training", "package_version"):  # fmt: skip
        assert f'"{key}"' in text


def test_pytorch_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    zipped = tmp_path / "model.pt"
    torch.save(TwoStreamUNet(CONFIG).state_dict(), zipped)
    with pytest.raises(FewLabelError, match=r"pickle checkpoint.*never unpickles.*safetensors"):
        load_checkpoint(zipped)

    raw = tmp_path / "legacy.safetensors"  # a misleading name does not help
    raw.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    with pytest.raises(FewLabelError, match="pickle checkpoint"):
        read_card(raw)


def test_other_files_are_refused_with_a_clear_message(tmp_path):
    junk = tmp_path / "notes.safetensors"
    junk.write_text("hello world, not a model")
    with pytest.raises(FewLabelError, match="not a safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(FewLabelError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(FewLabelError, match="no napari-fewlabel model card"):
        load_checkpoint(foreign)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    net = TwoStreamUNet(CONFIG)
    target = tmp_path / "m.safetensors"
    save_checkpoint(target, net, _card())
    first = target.read_bytes()
    save_checkpoint(target, net, _card(slice_axis=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() != first
    assert read_card(target).slice_axis == 2


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = TwoStreamUNet(CONFIG)
    target = tmp_path / "m.safetensors"
    save_checkpoint(target, net, _card())

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("napari_fewlabel.models.checkpoint.save_file", broken_save)
    with pytest.raises(FewLabelError, match="Cannot write"):
        save_checkpoint(target, net, _card(slice_axis=0))
    assert read_card(target).slice_axis == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    net = TwoStreamUNet(CONFIG)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        sum(o.mean() for o in net(x)).backward()
        opt.step()
    path = save_checkpoint(tmp_path / "m.safetensors", net, _card(), optimizer=opt)
    state = load_optimizer_state(path)
    assert state is not None
    fresh = torch.optim.AdamW(TwoStreamUNet(CONFIG).parameters(), lr=1e-3)
    fresh.load_state_dict(state)
    for index, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            assert torch.equal(fresh.state_dict()["state"][index][name], value)
    assert load_optimizer_state(save_checkpoint(tmp_path / "n.safetensors", net, _card())) is None


def test_encoder_weights_transfer_to_a_network_with_other_classes(tmp_path):
    torch.manual_seed(0)
    source = TwoStreamUNet(CONFIG)
    path = save_checkpoint(tmp_path / "m.safetensors", source, _card())
    target = TwoStreamUNet(UNetConfig(3, 5, (8, 16), 4))
    names = load_encoder_weights(target, path)
    assert names
    for name, tensor in target.encoder.state_dict().items():
        assert torch.equal(tensor, source.encoder.state_dict()[name])
    with pytest.raises(FewLabelError, match="does not fit"):
        load_encoder_weights(TwoStreamUNet(UNetConfig(1, 3, (8, 16), 4)), path)


def test_inconsistent_card_is_reported():
    with pytest.raises(FewLabelError, match="inconsistent"):
        build_network(_card(classes=default_classes(4)))
