"""`fewlabel emphysema CT --out DIR`: masks and scores on disk, exit 2 on a non-CT input."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import real_data
from chest_phantom import synthetic_chest
from napari_fewlabel.cli import main
from napari_fewlabel.infer.emphysema import REGIONS
from napari_fewlabel.io import load_volume, read_mask_info, save_image

OUTPUTS = {"lungs.nii.gz", "low_attenuation.nii.gz", "emphysema.csv", "emphysema.json"}


def test_lung1_writes_masks_on_the_scan_grid_and_scores(tmp_path, capsys):
    source = real_data.lung1_image()
    out = tmp_path / "results"
    assert main(["emphysema", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no temporary file left behind

    scan = load_volume(source)
    lungs_file = nib.load(out / "lungs.nii.gz")
    assert lungs_file.shape == scan.grid.shape
    assert np.allclose(lungs_file.affine, scan.grid.affine, atol=1e-4)
    lungs = load_volume(out / "lungs.nii.gz").array
    low = load_volume(out / "low_attenuation.nii.gz").array
    assert set(np.unique(lungs)) == {0, 1, 2}
    # Read back on the display grid, the masks agree with the CT voxel for voxel.
    assert np.array_equal(low > 0, (lungs > 0) & (scan.array < -950))
    # Saved with their names: napari and `fewlabel info` show which value is which lung.
    names = [c["name"] for c in read_mask_info(out / "lungs.nii.gz").classes]
    assert names == ["background", "right lung", "left lung"]
    assert read_mask_info(out / "low_attenuation.nii.gz").classes[1]["name"].startswith("LAA-950")

    document = json.loads((out / "emphysema.json").read_text())
    assert document["scan"] == str(source)
    with (out / "emphysema.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["region"] for row in rows] == list(REGIONS)
    both = rows[0]
    assert float(both["laa_percent"]) == pytest.approx(
        100 * np.mean(scan.array[lungs > 0] < -950), abs=0.01
    )
    assert float(both["laa_percent"]) == document["laa_percent"]
    assert int(rows[1]["voxels"]) == np.count_nonzero(lungs == 1)
    assert "both lungs" in printed and "%LAA-950" in printed
    assert f"{float(both['laa_percent']):.2f}" in printed


def test_threshold_and_json_output(tmp_path, capsys):
    chest = synthetic_chest()
    ct = save_image(chest.scan, tmp_path / "chest.nii.gz")
    assert (
        main(
            ["emphysema", str(ct), "--out", str(tmp_path / "out"), "--threshold", "-990", "--json"]
        )
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert document["threshold_hu"] == -990
    lungs = chest.right_lung | chest.left_lung
    expected = 100 * np.mean(chest.scan.array[lungs] < -990)
    assert document["laa_percent"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "empty-folder"])
def test_mr_input_exits_2_and_writes_nothing(tmp_path, capsys, existing):
    out = tmp_path / "results"
    if existing:
        out.mkdir()
    assert main(["emphysema", str(real_data.itk_t1()), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewlabel: error: ")
    assert "MR scan" in err and "chest CT" in err
    assert out.is_dir() == existing
    if existing:
        assert list(out.iterdir()) == []


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    assert main(["emphysema", str(real_data.itk_t1()), "--out", str(taken)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"
