"""`fewlabel info` and the CLI's error contract (exit code 2 with a sentence)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import real_data
from napari_fewlabel.cli import main


def test_info_json_on_a_real_ct(capsys):
    assert main(["info", str(real_data.lung1_image()), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [48, 512, 512]
    assert info["spacing_mm_zyx"] == pytest.approx([5.0, 0.5703, 0.5703], abs=1e-4)
    assert info["file_orientation"] == "LPS"
    assert info["display_orientation"] == "SPL"
    assert info["modality"] == "CT"
    assert info["intensity_range"] == [-1024.0, 3071.0]
    assert "mask" not in info


def test_info_names_a_masks_classes_and_marks(capsys, tmp_path):
    from napari_fewlabel.io import MaskInfo, load_volume, save_labels

    scan = load_volume(real_data.itk_t1())
    mask = np.zeros(scan.shape, np.uint8)
    mask[5, 3:6, 3:6] = 1
    classes = ({"index": 0, "name": "background", "color": [0, 0, 0]},
               {"index": 1, "name": "tumour", "color": [255, 0, 0]})  # fmt: skip
    info = MaskInfo(classes=classes, empty_axis=0, empty_slices=(2, 9))
    path = save_labels(mask, like=scan, path=tmp_path / "annotation.nii.gz", info=info)
    assert main(["info", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["mask"] is True
    assert shown["classes"] == ["0 background", "1 tumour"]
    assert shown["marked_empty"] == {"axis": 0, "slices": [2, 9]}
    assert main(["info", str(real_data.lung1_label())]) == 0  # another tool's mask
    assert re.search(r"^mask\s+True$", capsys.readouterr().out, re.MULTILINE)


def test_info_table_on_a_dicom_folder(capsys, lung1_dicom):
    assert main(["info", str(lung1_dicom.folder)]) == 0
    out = capsys.readouterr().out
    assert "DICOM" in out
    assert "#1 Scout (2 images)" in out


def test_bad_input_exits_2_with_a_sentence(tmp_path, capsys):
    bad = tmp_path / "scan.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10\n\n")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewlabel: error: Could not read scan.nrrd")


def test_installed_command_runs():
    exe = shutil.which("fewlabel")
    cmd = [exe] if exe else [sys.executable, "-m", "napari_fewlabel.cli"]
    result = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    assert "info" in result.stdout
    missing = subprocess.run([*cmd, "info", "/no/such/scan.nii.gz"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "No file or folder" in missing.stderr
