"""Every command checks its paths before any work, and damaged models or full disks exit 2.

Real files throughout: NIfTI scans written with nibabel, checkpoints written
by the package then damaged, full and read-only folders as small tmpfs mounts
(skipped where the test cannot mount).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import small_disks
from napari_fewlabel.cli import main
from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.io import save_labels
from napari_fewlabel.models.card import CARD_KEY
from napari_fewlabel.models.checkpoint import ModelCard, save_checkpoint
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train import finetune

TINY = UNetConfig(widths=(8, 16), full_res_width=4)


def test_importing_the_cli_does_not_import_torch():
    probe = "import sys, napari_fewlabel.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_bad_argument_is_reported_before_torch_is_imported(tmp_path):
    probe = (
        "import sys\n"
        "from napari_fewlabel.cli import main\n"
        "code = main(['predict', 'missing.safetensors', 'missing.nii.gz', '--out', 'x.txt'])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "--out must end in .nii.gz, .nii or .dcm, got 'x.txt'" in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_with_missing_files_and_a_wrong_extension_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "missing.safetensors", "missing.nii.gz", "--out", "x.txt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewlabel: error: --out must end in .nii.gz, .nii or .dcm")
    assert err.count("\n") == 1  # one line, no traceback
    assert main(["predict", "missing.safetensors", "missing.nii.gz", "--out", "x.nii.gz"]) == 2
    assert "No model file or named model 'missing.safetensors'" in capsys.readouterr().err
    assert main(["predict", "ideal-encoder", "missing.nii.gz", "--out", "x.nii.gz"]) == 2
    assert "No file or folder at missing.nii.gz" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the writability probe left nothing


# Inputs need not exist: the output is checked first, so none of these reads anything.
OUTPUT_CASES = {
    "predict wrong extension": (
        ["predict", "m.safetensors", "ct.nii.gz", "--out", "{tmp}/mask.txt"],
        "--out must end in .nii.gz, .nii or .dcm",
    ),
    "predict into a folder": (
        ["predict", "m.safetensors", "ct.nii.gz", "--out", "{tmp}/folder"],
        "is a folder: give a file name in it",
    ),
    "predict into a missing folder": (
        ["predict", "m.safetensors", "ct.nii.gz", "--out", "{tmp}/missing/mask.nii.gz"],
        "does not exist: create it or choose another --out",
    ),
    "predict under a file": (
        ["predict", "m.safetensors", "ct.nii.gz", "--out", "{tmp}/file.txt/mask.nii.gz"],
        "is a file, not a folder",
    ),
    "finetune wrong extension": (
        ["finetune", "ct.nii.gz", "labels.nii.gz", "--out", "{tmp}/model.pt"],
        "--out must end in .safetensors",
    ),
    "finetune into a missing folder": (
        ["finetune", "ct.nii.gz", "labels.nii.gz", "--out", "{tmp}/missing/m.safetensors"],
        "does not exist",
    ),
    "pretrain wrong extension": (
        ["pretrain", "scans", "--out", "{tmp}/encoder.nii.gz"],
        "--out must end in .safetensors",
    ),
    "adapt into a folder": (
        ["adapt", "m.safetensors", "--target", "ct.nii.gz", "--out", "{tmp}/folder"],
        "is a folder",
    ),
    "evaluate --json wrong extension": (
        ["evaluate", "a.nii.gz", "b.nii.gz", "--json", "{tmp}/report.txt"],
        "--json must end in .json",
    ),
    "evaluate --json under a file": (
        ["evaluate", "a.nii.gz", "b.nii.gz", "--json", "{tmp}/file.txt/report.json"],
        "is a file, not a folder: choose another --json",
    ),
    "emphysema --out is a file": (
        ["emphysema", "ct.nii.gz", "--out", "{tmp}/file.txt"],
        "is a file",
    ),
    "emphysema --out under a file": (
        ["emphysema", "ct.nii.gz", "--out", "{tmp}/file.txt/results"],
        "is a file, not a folder",
    ),
    "demo --out is a file": (["demo", "--headless", "--out", "{tmp}/file.txt"], "is a file"),
    "demo --screenshot wrong extension": (
        ["demo", "--screenshot", "{tmp}/shot.jpg"],
        "--screenshot must end in .png",
    ),
}


@pytest.mark.parametrize(("argv", "message"), OUTPUT_CASES.values(), ids=OUTPUT_CASES.keys())
def test_every_output_path_is_checked_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------ real files
@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("checks")
    ph = cardiac_phantom("CT", seed=3, shape=(8, 32, 32), spacing_mm=(4.0, 3.0, 3.0))
    image = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.to_file_grid(ph.image.array), ph.image.grid.affine), image)
    painted = np.zeros_like(ph.labels.array)
    painted[[2, 5]] = ph.labels.array[[2, 5]]
    labels = save_labels(painted, like=ph.image, path=folder / "labels.nii.gz")
    truth = save_labels(ph.labels.array, like=ph.image, path=folder / "truth.nii.gz")
    return image, labels, truth


def test_predict_with_a_damaged_model_exits_2_naming_it(scan, tmp_path, capsys):
    image, _, _ = scan
    card = ModelCard(
        architecture=TINY.to_dict(),
        classes=default_classes(2),
        modality="CT",
        normalization=NormalizationConfig.for_modality("CT"),
        input_size=(32, 32),
    )
    model = save_checkpoint(tmp_path / "model.safetensors", TwoStreamUNet(TINY), card)
    raw = model.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    absurd = json.loads(header["__metadata__"][CARD_KEY])
    absurd["architecture"]["full_res_width"] = 1_000_000  # ~72 TB if it were built
    header["__metadata__"][CARD_KEY] = json.dumps(absurd)
    text = json.dumps(header).encode()
    model.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(model), str(image), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{model}: its model card describes a network that cannot be built" in err
    assert "full_res_width 1000000" in err and "re-train" in err
    assert not out.exists()

    model.write_bytes(raw[: len(raw) // 2])  # truncated, as by a copy that stopped
    assert main(["predict", str(model), str(image), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{model} is damaged or incomplete" in err and "Traceback" not in err


def test_evaluate_json_to_a_read_only_or_full_folder_exits_2(scan, tmp_path, capsys):
    _, _, truth = scan
    with small_disks.tmpfs(tmp_path / "ro", read_only=True) as folder:
        assert main(["evaluate", str(truth), str(truth), "--json", str(folder / "r.json")]) == 2
        err = capsys.readouterr().err
        assert "Cannot write to folder" in err and "Read-only file system" in err
        assert capsys.readouterr().out == ""  # refused before the figures were computed

    with small_disks.tmpfs(tmp_path / "full") as folder:
        small_disks.fill(folder)
        report = folder / "report.json"
        assert main(["evaluate", str(truth), str(truth), "--json", str(report)]) == 2
        err = capsys.readouterr().err
        assert f"Cannot write {report} (No space left on device; 0 bytes free)" in err
        assert sorted(p.name for p in folder.iterdir()) == ["filler"]  # no temp file left


def test_finetune_to_a_full_disk_is_refused_before_training(scan, tmp_path, capsys, monkeypatch):
    image, labels, _ = scan
    jobs = []
    monkeypatch.setattr(finetune, "FinetuneJob", lambda *a, **k: jobs.append(a))
    with small_disks.tmpfs(tmp_path / "full", size="1m") as folder:
        small_disks.fill(folder)
        out = folder / "model.safetensors"
        args = ["finetune", str(image), str(labels), "--out", str(out), "--steps", "2"]
        assert main([*args, "--device", "cpu", "--model", "random"]) == 2
        err = capsys.readouterr().err
        assert f"Not enough space for {out} (0 bytes free; it needs about 32 MB)" in err
        assert "free some space" in err and "Traceback" not in err
        assert jobs == []  # no training was started
        assert sorted(p.name for p in folder.iterdir()) == ["filler"]


def test_finetune_when_the_disk_fills_during_training_exits_2_and_leaves_no_temp_file(
    scan, tmp_path, capsys, monkeypatch
):
    """The check before training passes (here: asked for 0 bytes); the disk is full by the
    time the model is written."""
    image, labels, _ = scan
    monkeypatch.setattr(
        finetune, "FinetuneJob", functools.partial(finetune.FinetuneJob, architecture=TINY)
    )
    monkeypatch.setattr("napari_fewlabel.cli._MODEL_NEED_BYTES", 0)
    with small_disks.tmpfs(tmp_path / "full") as folder:
        small_disks.fill(folder)
        out = folder / "model.safetensors"
        args = ["finetune", str(image), str(labels), "--out", str(out), "--steps", "2"]
        assert main([*args, "--device", "cpu", "--model", "random"]) == 2
        err = capsys.readouterr().err
        assert f"Cannot write {out} (No space left on device; 0 bytes free)" in err
        assert "free some space" in err and "Traceback" not in err
        assert sorted(p.name for p in folder.iterdir()) == ["filler"]
