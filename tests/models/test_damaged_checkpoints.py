"""Damaged, truncated and hostile model files: one FewLabelError sentence each, never a traceback.

Every file here is a real checkpoint written by :func:`save_checkpoint` and then
damaged byte by byte, or a real safetensors file whose card or tensors were
edited; full and read-only folders are real tmpfs mounts.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import small_disks
from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import STALE_AFTER_S, is_our_temp_file
from napari_fewlabel.models.card import CARD_KEY
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    check_output_path,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig

CONFIG = UNetConfig(in_slices=3, num_classes=3, widths=(8, 16), full_res_width=4)


def _card() -> ModelCard:
    return ModelCard(
        architecture=CONFIG.to_dict(),
        classes=default_classes(3),
        modality="MR",
        normalization=NormalizationConfig.for_modality("MR"),
        input_size=(64, 48),
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "model.safetensors", TwoStreamUNet(CONFIG), _card())


def _header(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _assert_one_sentence_naming(exc: pytest.ExceptionInfo[FewLabelError], path: Path) -> None:
    message = str(exc.value)
    assert path.name in message
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith(".")


# ------------------------------------------------------------- damaged files
def _invalid_json(raw: bytes, length: int) -> bytes:
    return raw[:9] + b"#" * (length - 1) + raw[8 + length :]


def _edit_header(change):
    def damage(raw: bytes, length: int) -> bytes:
        header = json.loads(raw[8 : 8 + length])
        change(header)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + raw[8 + length :]

    return damage


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


DAMAGED_FILES = {
    "invalid JSON header": _invalid_json,
    "header not UTF-8": lambda raw, n: raw[:9] + b"\xff" * (n - 1) + raw[8 + n :],
    "header is a list": lambda raw, n: struct.pack("<Q", 2) + b"[]",
    "truncated in the tensors": lambda raw, n: raw[:-100],
    "truncated in the header": lambda raw, n: raw[: 8 + n // 2],
    "header length larger than the file": lambda raw, n: struct.pack("<Q", len(raw)) + raw[8:],
    "header length 2**63": lambda raw, n: struct.pack("<Q", 2**63) + raw[8:],
    "bytes appended": lambda raw, n: raw + b"\0" * 16,
    "metadata not text": _edit_header(lambda h: h["__metadata__"].update({"x": 1})),
    "unknown dtype": _edit_header(lambda h: _first_tensor(h).update(dtype="F128")),
    "shape that does not fill its bytes": _edit_header(
        lambda h: _first_tensor(h).update(shape=[10**6, 10**6])
    ),
    "negative shape": _edit_header(lambda h: _first_tensor(h).update(shape=[-1])),
    "offsets shifted": _edit_header(
        lambda h: _first_tensor(h).update(
            data_offsets=[o + 4 for o in _first_tensor(h)["data_offsets"]]
        )
    ),
    "tensor without offsets": _edit_header(lambda h: _first_tensor(h).pop("data_offsets")),
}


@pytest.mark.parametrize("damage", DAMAGED_FILES.values(), ids=DAMAGED_FILES.keys())
def test_a_damaged_file_is_named_and_refused(checkpoint, damage):
    raw = checkpoint.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    checkpoint.write_bytes(damage(raw, length))
    with pytest.raises(FewLabelError) as read:
        read_card(checkpoint)
    _assert_one_sentence_naming(read, checkpoint)
    with pytest.raises(FewLabelError) as loaded:
        load_checkpoint(checkpoint)
    _assert_one_sentence_naming(loaded, checkpoint)
    assert "damaged" in str(loaded.value) or "not a safetensors file" in str(loaded.value)


def test_tensors_that_do_not_fit_the_card_are_refused_before_they_are_read(checkpoint):
    _, header, _ = _header(checkpoint)
    metadata = header["__metadata__"]
    state = {"model." + k: v for k, v in TwoStreamUNet(CONFIG).state_dict().items()}
    first = next(iter(state))
    cases = {
        "missing": {k: v for k, v in state.items() if k != first},
        "extra": {**state, "model.spare.weight": torch.zeros(3)},
        "wrong shape": {**state, first: torch.zeros(2, 2)},
        "wrong dtype": {**state, first: state[first].to(torch.int32)},
    }
    for name, tensors in cases.items():
        path = checkpoint.with_name(f"{name.replace(' ', '_')}.safetensors")
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(FewLabelError, match="do not fit the network") as exc:
            load_checkpoint(path)
        _assert_one_sentence_naming(exc, path)

    half = checkpoint.with_name("half.safetensors")  # float16 weights load (cast back)
    save_file({k: v.half() for k, v in state.items()}, str(half), metadata=metadata)
    assert next(load_checkpoint(half).network.parameters()).dtype == torch.float32


# ------------------------------------------------------------- damaged cards
def _set(path: str, value):
    def change(card: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            card = card[int(key)] if isinstance(card, list) else card[key]
        card[last] = value

    return change


def _drop(key: str):
    return lambda card: card.pop(key)


DAMAGED_CARDS = {
    "no classes": _drop("classes"),
    "classes empty": _set("classes", []),
    "classes not a list": _set("classes", "LV, RV"),
    "class without colour": lambda card: card["classes"][1].pop("color"),
    "colour out of range": lambda card: card["classes"][1].update(color=[0, 999, 0]),
    "class index text": lambda card: card["classes"][1].update(index="one"),
    "class indices out of order": lambda card: card["classes"][1].update(index=5),
    "one class": lambda card: card.update(classes=card["classes"][:1]),
    "unknown modality": _set("modality", "PET"),
    "no normalisation": _drop("normalization"),
    "unknown normalisation": _set("normalization", {"method": "magic"}),
    "empty CT window": _set("normalization", {"method": "ct_window", "window_hu": [5, 5]}),
    "negative input size": _set("input_size", [-64, 64]),
    "huge input size": _set("input_size", [10**6, 10**6]),
    "input size of three": _set("input_size", [64, 64, 64]),
    "input size as text": _set("input_size", ["64", "64"]),
    "slice axis 5": _set("slice_axis", 5),
    "training not an object": _set("training", [1, 2]),
    "no architecture": _drop("architecture"),
    "architecture without a name": lambda card: card["architecture"].pop("name"),
    "another network": _set("architecture.name", "ResNet50"),
    "full_res_width 1000000": _set("architecture.full_res_width", 1_000_000),
    "negative width": _set("architecture.widths", [-8, 16]),
    "huge widths": _set("architecture.widths", [1024] * 8),
    "one width": _set("architecture.widths", [8]),
    "widths as text": _set("architecture.widths", "8,16"),
    "width as a float": _set("architecture.widths", [8.5, 16]),
    "even in_slices": _set("architecture.in_slices", 2),
    "in_slices 1000": _set("architecture.in_slices", 1001),
    "in_slices true": _set("architecture.in_slices", True),
    "a million classes": _set("architecture.num_classes", 10**6),
    "classes do not match the outputs": _set("architecture.num_classes", 4),
    "unknown norm": _set("architecture.norm", "batch"),
    "no full_res_width": lambda card: card["architecture"].pop("full_res_width"),
}


@pytest.mark.parametrize("change", DAMAGED_CARDS.values(), ids=DAMAGED_CARDS.keys())
def test_a_damaged_card_is_one_sentence(checkpoint, change):
    _, header, data = _header(checkpoint)
    card = json.loads(header["__metadata__"][CARD_KEY])
    change(card)
    header["__metadata__"][CARD_KEY] = json.dumps(card)
    _write(checkpoint, header, data)
    with pytest.raises(FewLabelError) as exc:
        load_checkpoint(checkpoint)  # would allocate terabytes if the card were trusted
    _assert_one_sentence_naming(exc, checkpoint)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format_version": 99}', "update napari-fewlabel"),
        ("[" * 100_000, "not valid JSON"),  # deep nesting: RecursionError inside json
    ],
)
def test_card_text_that_is_not_a_card(checkpoint, text, expected):
    _, header, data = _header(checkpoint)
    header["__metadata__"][CARD_KEY] = text
    _write(checkpoint, header, data)
    with pytest.raises(FewLabelError, match=expected) as exc:
        read_card(checkpoint)
    _assert_one_sentence_naming(exc, checkpoint)


def test_an_absurd_network_from_the_card_is_refused_before_it_is_built():
    card = ModelCard(
        architecture={**CONFIG.to_dict(), "widths": [1024] * 8, "full_res_width": 1024},
        classes=default_classes(3),
        modality="MR",
        normalization=NormalizationConfig.for_modality("MR"),
        input_size=(64, 64),
    )
    from napari_fewlabel.models.checkpoint import build_network

    with pytest.raises(FewLabelError, match="million parameters"):
        build_network(card)


# ----------------------------------------------------- full and read-only disks
def test_a_full_disk_is_reported_with_the_free_space_and_leaves_nothing(tmp_path):
    big = TwoStreamUNet(UNetConfig())  # about 8 MB of weights, a 64 KB disk
    with small_disks.tmpfs(tmp_path / "disk") as disk:
        target = disk / "model.safetensors"
        with pytest.raises(FewLabelError, match=r"Cannot write .*model\.safetensors.*free") as exc:
            save_checkpoint(target, big, _card_for(UNetConfig()))
        assert "No space left on device" in str(exc.value)
        assert list(disk.iterdir()) == []


def _card_for(config: UNetConfig) -> ModelCard:
    return ModelCard(
        architecture=config.to_dict(),
        classes=default_classes(config.num_classes),
        modality="MR",
        normalization=NormalizationConfig.for_modality("MR"),
        input_size=(64, 64),
    )


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    with small_disks.tmpfs(tmp_path / "ro", read_only=True) as folder:
        with pytest.raises(FewLabelError, match=r"Cannot write to folder .*Read-only"):
            check_output_path(folder / "model.safetensors")
        with pytest.raises(FewLabelError, match="Cannot write to"):
            save_checkpoint(folder / "model.safetensors", TwoStreamUNet(CONFIG), _card())


# ------------------------------------------------------- killed writes' leftovers
_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from napari_fewlabel.io.atomic import atomic_path

writing = atomic_path(Path(sys.argv[1]))
tmp = writing.__enter__()
tmp.write_bytes(b"half a checkpoint")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write(tmp_path, checkpoint):
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(checkpoint)], check=False)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p != checkpoint]
    assert len(leftovers) == 1 and is_our_temp_file(leftovers[0])
    stale = leftovers[0]
    old = time.time() - STALE_AFTER_S - 5
    os.utime(stale, (old, old))
    fresh = tmp_path / ".other.safetensors.fewlabel-tmp-abcd1234.safetensors"  # a write going on
    fresh.write_bytes(b"being written")
    foreign = tmp_path / ".model.safetensors.notes"  # not ours, however old
    foreign.write_bytes(b"keep me")
    os.utime(foreign, (old, old))

    save_checkpoint(checkpoint, TwoStreamUNet(CONFIG), _card())
    assert not stale.exists()
    assert fresh.exists() and foreign.exists()
    assert load_checkpoint(checkpoint).card == _card()


def test_a_job_start_removes_stale_temp_files(tmp_path):
    stale = tmp_path / ".model.safetensors.fewlabel-tmp-k2j3h4_x.safetensors"
    stale.write_bytes(b"half")
    old = time.time() - STALE_AFTER_S - 5
    os.utime(stale, (old, old))
    assert check_output_path(tmp_path / "model.safetensors") == tmp_path / "model.safetensors"
    assert not stale.exists()
