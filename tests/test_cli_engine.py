"""The engine's CLI commands end to end: finetune -> predict -> evaluate."""

from __future__ import annotations

import functools
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_fewlabel.cli import main
from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.io import load_volume, save_labels
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import finetune


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    ph = cardiac_phantom("CT", seed=3, shape=(12, 64, 64), spacing_mm=(4.0, 3.0, 3.0))
    painted = np.zeros_like(ph.labels.array)
    painted[[4, 8]] = ph.labels.array[[4, 8]]
    image = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.to_file_grid(ph.image.array), ph.image.grid.affine), image)
    labels = save_labels(painted, like=ph.image, path=folder / "labels.nii.gz")
    truth = save_labels(ph.labels.array, like=ph.image, path=folder / "truth.nii.gz")
    return folder, image, labels, truth


def test_finetune_predict_evaluate(scan_files, capsys, monkeypatch):
    folder, image, labels, truth = scan_files
    # The CLI builds the default network; keep it small here so the test stays quick.
    small = UNetConfig(widths=(8, 16, 32), full_res_width=4)
    monkeypatch.setattr(
        finetune, "FinetuneJob", functools.partial(finetune.FinetuneJob, architecture=small)
    )
    model = folder / "model.safetensors"
    names = "background,LV,myo,RV,LA,aorta"
    code = main(
        ["finetune", str(image), str(labels), "--out", str(model), "--steps", "3",
         "--device", "cpu", "--classes", names]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Slice axis 0" in captured.err
    assert "3/3" in captured.err  # the progress bar reached the end
    assert f"Wrote {model}" in captured.out
    card = read_card(model)
    assert card.modality == "CT" and card.normalization.method == "ct_window"
    assert card.class_names == tuple(names.split(","))
    assert card.training["settings"]["stop_when_converged"]["speedup"] == 2.0  # the default

    every = folder / "every.safetensors"
    assert main(["finetune", str(image), str(labels), "--out", str(every), "--steps", "1",
                 "--device", "cpu", "--classes", names, "--every-step"]) == 0  # fmt: skip
    assert read_card(every).training["settings"]["stop_when_converged"] is None
    capsys.readouterr()

    mask = folder / "mask.nii.gz"
    assert main(["predict", str(model), str(image), "--out", str(mask), "--device", "cpu"]) == 0
    predicted = load_volume(mask)
    bar = capsys.readouterr().err  # the prediction's progress, over every plane's slices
    planes = read_card(model).inference.get("planes", [read_card(model).slice_axis])
    total = sum(predicted.shape[p] for p in planes)
    assert f"{total}/{total}  slices" in bar
    scan = load_volume(image)
    assert predicted.shape == scan.shape
    np.testing.assert_allclose(predicted.affine, scan.affine)
    assert nib.load(str(mask)).get_data_dtype() == np.uint8

    report = folder / "report.json"
    assert (
        main(["evaluate", str(truth), str(truth), "--json", str(report), "--model", str(model)])
        == 0
    )
    table = capsys.readouterr().out
    assert "1 LV" in table and "mean" in table
    figures = json.loads(report.read_text())
    assert figures["mean_dice"] == 1.0
    assert [c["name"] for c in figures["classes"]] == names.split(",")[1:]
    assert all(c["hd95_mm"] == 0.0 for c in figures["classes"])


def test_user_errors_exit_with_code_2_and_a_message(scan_files, tmp_path, capsys):
    _, image, _, truth = scan_files
    code = main(["predict", str(tmp_path / "nope.safetensors"), str(image), "--out", "m.nii.gz"])
    assert code == 2
    assert "fewlabel: error: No model file or named model" in capsys.readouterr().err

    pickled = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(1)}, pickled)
    assert main(["predict", str(pickled), str(image), "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert "never unpickles" in capsys.readouterr().err

    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 12), np.uint8), nib.load(str(truth)).affine), empty)
    out = tmp_path / "m.safetensors"
    assert main(["finetune", str(image), str(empty), "--out", str(out), "--device", "cpu"]) == 2
    assert "No labelled slice" in capsys.readouterr().err
    assert not out.exists()

    # A slice marked empty that has paint on it (slice 4 is painted).
    labels = scan_files[2]
    args = ["finetune", str(image), str(labels), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--empty-slices", "0", "4"]) == 2
    assert "Slice(s) 4 along z (axial) are marked empty but have painted" in capsys.readouterr().err
    assert main([*args, "--empty-slices", "12"]) == 2
    assert "outside the scan (0..11" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_refuses_masks_of_different_scans(scan_files, tmp_path, capsys):
    _, _, _, truth = scan_files
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), other)
    assert main(["evaluate", str(other), str(truth)]) == 2
    assert "not on the same grid" in capsys.readouterr().err


def test_finetune_takes_the_marks_and_classes_saved_with_the_annotation(
    scan_files, tmp_path, capsys, monkeypatch
):
    """An annotation saved from napari carries its empty slices and class names to the CLI."""
    from napari_fewlabel.io import MaskInfo

    _, image, labels, _ = scan_files
    small = UNetConfig(widths=(8, 16, 32), full_res_width=4)
    monkeypatch.setattr(
        finetune, "FinetuneJob", functools.partial(finetune.FinetuneJob, architecture=small)
    )
    names = ["background", "LV", "myo", "RV", "LA", "aorta"]
    info = MaskInfo(
        classes=tuple({"index": i, "name": n, "color": [i, i, i]} for i, n in enumerate(names)),
        empty_axis=0,
        empty_slices=(0, 11),
    )
    scan = load_volume(image)
    annotation = save_labels(
        load_volume(labels).array, like=scan, path=tmp_path / "annotation.nii.gz", info=info
    )
    model = tmp_path / "model.safetensors"
    args = ["finetune", str(image), str(annotation), "--out", str(model), "--steps", "1",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Slices marked empty in annotation.nii.gz (axis 0): 0, 11" in err
    card = read_card(model)
    assert card.class_names == tuple(names)
    assert card.training["data"]["empty_slices"] == [0, 11]

    # Given on the command line, --empty-slices and --classes win over the file.
    assert main([*args, "--empty-slices", "5", "--classes", "bg,a,b,c,d,e"]) == 0
    assert "Slices marked empty in" not in capsys.readouterr().err
    card = read_card(model)
    assert card.training["data"]["empty_slices"] == [5]
    assert card.class_names == ("bg", "a", "b", "c", "d", "e")

    # Marks along another axis than --axis: a sentence, exit 2, no model.
    model.unlink()
    assert main([*args, "--axis", "1"]) == 2
    assert "marks slices along axis 0 empty but --axis is 1" in capsys.readouterr().err
    assert not model.exists()
