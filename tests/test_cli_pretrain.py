"""``fewlabel pretrain`` end to end (single process; torchrun is in tests/train/test_pretrain.py)."""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.cli import main
from napari_fewlabel.models.checkpoint import is_encoder_only, read_card
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import pretrain


@pytest.fixture
def scan_folder(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, 24),) * 3, indexing="ij")
        head = (zz**2 + yy**2 + xx**2 < 0.8) * (400 + 80 * rng.standard_normal((24, 24, 24)))
        nib.save(nib.Nifti1Image(head.astype(np.int16), np.eye(4)), folder / f"head{i}.nii.gz")
    return folder


@pytest.fixture
def small_network(monkeypatch):
    small = UNetConfig(widths=(8, 16, 32), full_res_width=4)
    monkeypatch.setattr(
        pretrain, "PretrainJob", functools.partial(pretrain.PretrainJob, architecture=small)
    )


def test_pretrain_writes_encoder_and_state_and_resumes(
    scan_folder, tmp_path, capsys, small_network
):
    out = tmp_path / "enc.safetensors"
    args = ["pretrain", str(scan_folder), "--method", "medmoco", "--out", str(out),
            "--batch-size", "8", "--view-size", "32", "--slice-size", "64", "--device", "cpu",
            "--workers", "0", "--half", "--crop-scale", "0.6", "0.9"]  # fmt: skip
    assert main([*args, "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "effective rank" in captured.err
    assert f"Wrote {out}" in captured.out and "enc.state.safetensors" in captured.out
    card = read_card(out)
    assert is_encoder_only(card) and card.training["storage_dtype"] == "float16"
    assert card.training["settings"]["method"] == "medmoco"
    assert card.training["settings"]["views"]["crop_scale"] == [0.6, 0.9]

    assert main([*args, "--steps", "3", "--resume", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Resuming from enc.safetensors at step 2" in captured.err
    assert read_card(out).training["steps_done"] == 3

    # Continued pretraining: a new run from that encoder's weights.
    more = tmp_path / "more.safetensors"
    args[args.index(str(out))] = str(more)
    assert main([*args, "--steps", "1", "--init", str(out)]) == 0
    assert "Starting from the encoder enc.safetensors" in capsys.readouterr().err
    training = read_card(more).training
    assert training["steps_done"] == 1 and training["continued_from"]["steps_done"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "enc.pt"], "safetensors"),
        (["--out", "enc.safetensors", "--steps", "0"], "at least 1"),
        (["--out", "enc.safetensors", "--init", "no-such-encoder"], "No model file or named"),
        (["--out", "enc.safetensors", "--method", "drasclr", "--init", "x"], "--init is for"),
        (["--out", "enc.safetensors", "--crop-scale", "0.8", "0.5"], "0 < LOW <= HIGH <= 1"),
        (["--out", "enc.safetensors", "--crop-scale", "0.5", "1.5"], "0 < LOW <= HIGH <= 1"),
        (
            ["--out", "enc.safetensors", "--method", "drasclr", "--crop-scale", "0.5", "1"],
            "--crop-scale do(es) not apply",
        ),
    ],
)
def test_user_errors_exit_2_with_a_sentence(scan_folder, tmp_path, capsys, args, message):
    args = [a if not a.startswith("enc") else str(tmp_path / a) for a in args]
    assert main(["pretrain", str(scan_folder), *args, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_scans_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["pretrain", str(tmp_path / "empty"), "--out", str(tmp_path / "e.safetensors")])
    assert code == 2
    assert "No scans found" in capsys.readouterr().err
