"""`fewlabel adapt` end to end: MRI model + CT scan -> adapted CT model -> `fewlabel predict`."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.cli import main
from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.io import MaskInfo, load_volume, save_labels
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import adapt, finetune


def _save_scan(volume, path):
    nib.save(nib.Nifti1Image(volume.to_file_grid(volume.array), volume.grid.affine), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapt_cli")
    shape, spacing = (12, 64, 64), (4.0, 3.0, 3.0)
    mr = cardiac_phantom("MR", 0, shape, spacing)
    ct = cardiac_phantom("CT", 1, shape, spacing)
    mr_path = _save_scan(mr.image, folder / "mr.nii.gz")
    ct_path = _save_scan(ct.image, folder / "ct.nii.gz")
    mr_labels = save_labels(mr.labels.array, like=mr.image, path=folder / "mr_labels.nii.gz")
    source = folder / "source.safetensors"
    job = finetune.FinetuneJob(
        image=load_volume(mr_path),
        labels=load_volume(mr_labels),
        out=source,
        classes=mr.classes,
        model="random",
        steps=2,
        device="cpu",
        settings=finetune.FinetuneSettings.supervised(),
        architecture=UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4),
    )
    list(finetune.run(job))
    return folder, source, mr_path, ct_path


def test_adapt_then_predict(files, capsys, monkeypatch):
    folder, source, mr_path, ct_path = files

    # Keep the critic small so the test stays quick; everything else is the CLI's.
    @dataclass(frozen=True)
    class SmallCritic(adapt.AdaptSettings):
        critic_width: int = 8

    monkeypatch.setattr(adapt, "AdaptSettings", SmallCritic)
    out = folder / "adapted.safetensors"
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--out", str(out), "--steps", "2", "--warmup", "1", "--critic-updates", "2",
         "--device", "cpu"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2/2" in captured.err and "Wasserstein" in captured.err
    assert "DAM loss" in captured.err  # the step after the warm-up updated the DAM
    assert f"Wrote {out}" in captured.out
    card = read_card(out)
    assert card.modality == "CT" and card.training["settings"]["critic_updates"] == 2
    assert adapt.state_path(out).is_file()

    mask = folder / "mask.nii.gz"
    assert main(["predict", str(out), str(ct_path), "--out", str(mask), "--device", "cpu"]) == 0
    assert load_volume(mask).shape == load_volume(ct_path).shape


def test_gp_objective_takes_five_critic_updates_unless_told(files, capsys, tmp_path):
    _, source, mr_path, ct_path = files
    common = ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
              "--steps", "1", "--warmup", "1", "--objective", "gp", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "gp.safetensors")]) == 0
    settings = read_card(tmp_path / "gp.safetensors").training["settings"]
    assert settings["objective"] == "gp" and settings["critic_updates"] == 5
    told = tmp_path / "gp3.safetensors"
    assert main([*common, "--out", str(told), "--critic-updates", "3"]) == 0
    assert read_card(told).training["settings"]["critic_updates"] == 3
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "adapted.pt"], "must end in .safetensors"),
        (["--out", "x.safetensors", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_advice(files, capsys, extra, message, tmp_path, monkeypatch):
    _, source, mr_path, ct_path = files
    monkeypatch.chdir(tmp_path)
    code = main(["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_mri_target_exits_2(files, capsys, tmp_path):
    _, source, mr_path, _ = files
    out = tmp_path / "a.safetensors"
    code = main(["adapt", str(source), "--target", str(mr_path), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "marked as MR" in err or "--source" in err
    assert not out.exists()


def test_target_labels_join_training_and_the_kept_checkpoint_is_said(files, capsys, tmp_path):
    _, source, mr_path, ct_path = files
    ct = load_volume(ct_path)
    truth = cardiac_phantom("CT", 1, (12, 64, 64), (4.0, 3.0, 3.0)).labels.array
    painted = np.zeros_like(truth)
    painted[6] = truth[6]
    labels = save_labels(painted, like=ct, path=tmp_path / "ct_labels.nii.gz")
    out = tmp_path / "a.safetensors"
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--target-labels", str(labels), "--out", str(out), "--steps", "2", "--warmup", "1",
         "--critic-updates", "1", "--check", "start_agreement", "--device", "cpu"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 painted CT slice(s) (6)" in captured.err
    assert f"Checkpoint kept: {adapt.NO_IMPROVEMENT}." in captured.out
    card = read_card(out)
    assert card.training["ct_labels_used"] is True and card.training["ct_labelled_slices"] == [6]


@pytest.mark.parametrize(
    ("make_labels", "message"),
    [
        # A mask of another scan: one slice fewer.
        (
            lambda ct, path: nib.save(
                nib.Nifti1Image(np.zeros((64, 64, 11), np.uint8), ct.grid.affine), path
            ),
            "first CT scan",
        ),
        (
            lambda ct, path: save_labels(np.zeros(ct.shape, np.uint8), like=ct, path=path),
            "no painted slice",
        ),
    ],
)
def test_unusable_target_labels_exit_2(files, capsys, tmp_path, make_labels, message):
    _, source, mr_path, ct_path = files
    labels = tmp_path / "ct_labels.nii.gz"
    make_labels(load_volume(ct_path), labels)
    out = tmp_path / "a.safetensors"
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--target-labels", str(labels), "--out", str(out), "--steps", "1", "--device", "cpu"]
    )  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_target_labels_named_for_other_classes_exit_2(files, capsys, tmp_path):
    _, source, mr_path, ct_path = files
    ct = load_volume(ct_path)
    painted = np.zeros(ct.shape, dtype=np.uint8)
    painted[6, 10:20, 10:20] = 1
    labels = save_labels(
        painted,
        like=ct,
        path=tmp_path / "liver.nii.gz",
        info=MaskInfo.of_classes(named_classes(["bg", "liver"])),
    )
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--target-labels", str(labels), "--out", str(tmp_path / "a.safetensors"),
         "--steps", "1", "--device", "cpu"]
    )  # fmt: skip
    assert code == 2
    assert "names its classes bg, liver" in capsys.readouterr().err


def test_a_target_box_makes_the_critic_look_at_that_region(files, capsys, tmp_path):
    _, source, mr_path, ct_path = files
    out = tmp_path / "roi.safetensors"
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--target-box", "2:10,8:56,8:56", "--out", str(out), "--steps", "1", "--warmup", "1",
         "--critic-updates", "1", "--device", "cpu"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "of CT scan 1" in captured.err and "from CT box" in captured.err
    card = read_card(out)
    assert card.training["settings"]["critic_region"] == "anatomy"
    assert card.training["critic_regions"]["ct"][0]["slices"] == [1, 10]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-box", "2:10,8:56"], "z0:z1,y0:y1,x0:x1"),
        (["--target-box", "2:10,8:56,8:99"], "outside the scan"),
        (["--target-box", "2:10,8:56,8:56", "--critic-region", "whole"], "--critic-region anatomy"),
    ],
)
def test_a_bad_region_exits_2_and_writes_nothing(files, capsys, tmp_path, extra, message):
    _, source, mr_path, ct_path = files
    out = tmp_path / "bad.safetensors"
    code = main(
        ["adapt", str(source), "--target", str(ct_path), "--source", str(mr_path),
         "--out", str(out), "--steps", "1", "--device", "cpu", *extra]
    )  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
