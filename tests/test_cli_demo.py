"""`fewlabel demo --headless`, the README's main job without a screen: fine-tune on the two
painted slices, predict the volume, write the files and the report."""

from __future__ import annotations

import json

import numpy as np

from napari_fewlabel.cli import main
from napari_fewlabel.io import load_volume


def test_the_headless_demo_writes_a_mask_on_the_scan_and_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--headless", "--out", str(out), "--steps", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 3/3" in captured.out
    assert "predicted" in captured.out and "slices" in captured.out  # the prediction's end
    assert "Mean Dice on the" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["labelled_slices"]
    assert 0.0 <= report["mean_dice_unlabelled_slices"] <= 1.0
    scan = load_volume(out / report["outputs"]["scan"])
    mask = load_volume(out / report["outputs"]["prediction"])
    assert mask.shape == scan.shape
    np.testing.assert_allclose(mask.grid.affine, scan.grid.affine)  # lies on the scan
    assert (out / report["outputs"]["model"]).is_file()
    assert not list(out.glob("*.tmp*"))
