"""`fewlabel emphysema CT --out DIR --subtype-labels LABELS`: subtype map and shares on disk."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from napari_fewlabel.cli import main
from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES
from napari_fewlabel.data.emphysema_phantom import emphysema_phantom
from napari_fewlabel.io import load_volume, read_mask_info, save_image, save_labels
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import read_card

SHARES = [
    "normal_lung_percent",
    "centrilobular_percent",
    "paraseptal_percent",
    "panlobular_percent",
]


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chest")
    ph = emphysema_phantom(0, shape=(40, 52, 72), spacing_mm=(4.0, 4.0, 4.0))
    truth = ph.labels.array
    painted = np.zeros_like(truth)
    rng = np.random.default_rng(0)
    for c in (1, 2, 3, 4):
        for z, y, x in np.argwhere(truth == c)[rng.choice(np.count_nonzero(truth == c), 3)]:
            painted[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = c
    painted[truth == 0] = 0
    ct = save_image(ph.scan, folder / "chest.nii.gz")
    labels = save_labels(painted, like=ph.scan, path=folder / "subtype_labels.nii.gz")
    return ct, labels, ph


def test_subtype_labels_give_a_map_on_the_ct_grid_and_shares_per_region(chest, tmp_path, capsys):
    ct, labels, _ = chest
    out = tmp_path / "results"
    argv = ["emphysema", str(ct), "--out", str(out), "--subtype-labels", str(labels)]
    assert main([*argv, "--subtype-steps", "3", "--stride", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "lungs.nii.gz",
        "low_attenuation.nii.gz",
        "subtypes.nii.gz",
        "subtype_model.safetensors",
        "emphysema.csv",
        "emphysema.json",
    }  # nothing temporary left behind
    scan = load_volume(ct)
    stored = nib.load(out / "subtypes.nii.gz")
    assert stored.shape == scan.grid.shape and np.allclose(stored.affine, scan.grid.affine)
    subtypes = load_volume(out / "subtypes.nii.gz").array
    lungs = load_volume(out / "lungs.nii.gz").array
    assert np.array_equal(subtypes > 0, lungs > 0) and set(np.unique(subtypes)) <= {0, 1, 2, 3, 4}
    saved = read_mask_info(out / "subtypes.nii.gz")
    assert [c["name"] for c in saved.classes] == [c.name for c in EMPHYSEMA_SUBTYPES]

    document = json.loads((out / "emphysema.json").read_text())
    shares = document["subtypes"]["percent_of_lung"]
    assert list(shares) == ["normal lung", "centrilobular", "paraseptal", "panlobular"]
    for value, name in enumerate(shares, start=1):
        assert shares[name] == pytest.approx(100 * np.mean(subtypes[lungs > 0] == value), abs=1e-3)
    with (out / "emphysema.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(sum(float(row[k]) for k in SHARES) == pytest.approx(100, abs=0.01) for row in rows)
    right = rows[1]
    assert right["region"] == "right lung"
    assert float(right["paraseptal_percent"]) == pytest.approx(
        100 * np.mean(subtypes[lungs == 1] == 3), abs=1e-3
    )
    assert "subtypes (% of lung)" in printed

    # The model it wrote maps the scan again without labels, to the same map.
    again = tmp_path / "again"
    model = str(out / "subtype_model.safetensors")
    assert (
        main(["emphysema", str(ct), "--out", str(again), "--subtype-model", model, "--stride", "6"])
        == 0
    )
    assert np.array_equal(load_volume(again / "subtypes.nii.gz").array, subtypes)


def test_extra_subtype_labels_are_learnt_from_too(chest, tmp_path):
    """Regions painted on a second CT join the training; the map is made for the first."""
    ct, labels, ph = chest
    other = emphysema_phantom(1, shape=(40, 52, 72), spacing_mm=(4.0, 4.0, 4.0))
    other_ct = save_image(other.scan, tmp_path / "other.nii.gz")
    truth = other.labels.array
    painted = np.where(np.isin(truth, (1, 4)), truth, 0).astype(np.uint8)  # broad regions
    other_labels = save_labels(painted, like=other.scan, path=tmp_path / "other_labels.nii.gz")
    out = tmp_path / "both"
    argv = ["emphysema", str(ct), "--out", str(out), "--subtype-labels", str(labels)]
    argv += ["--extra-subtype-labels", str(other_ct), str(other_labels)]
    assert main([*argv, "--subtype-steps", "2", "--stride", "6", "--device", "cpu"]) == 0
    card = read_card(out / "subtype_model.safetensors")
    assert len(card.training["scans"]) == 2
    voxels = card.training["labelled_voxels"]
    first = load_volume(labels).array
    assert voxels["normal lung"] > np.count_nonzero(first == 1)  # the second CT's regions count
    stored = load_volume(out / "subtypes.nii.gz")
    assert stored.shape == ph.scan.shape

    # A second CT without its own --subtype-labels is a mistake said as such.
    bad = ["emphysema", str(ct), "--out", str(tmp_path / "bad")]
    assert main([*bad, "--extra-subtype-labels", str(other_ct), str(other_labels)]) == 2


def test_bad_subtype_inputs_exit_2_and_write_nothing(chest, tmp_path, capsys):
    ct, labels, ph = chest
    out = tmp_path / "out"
    wrong_grid = save_labels(
        np.zeros((10, 10, 10), np.uint8),
        like=Volume.from_array(np.zeros((10, 10, 10))),
        path=tmp_path / "w.nii.gz",
    )
    empty = save_labels(np.zeros(ph.scan.shape, np.uint8), like=ph.scan, path=tmp_path / "e.nii.gz")
    mr = save_image(ph.scan.with_array(ph.scan.array + 1024, modality="MR"), tmp_path / "mr.nii.gz")
    cases = [
        ([str(ct), "--subtype-labels", str(wrong_grid)], "not on the CT's grid"),
        (
            [str(ct), "--subtype-labels", str(empty), "--subtype-steps", "3"],
            "at least two subtypes",
        ),
        ([str(mr), "--subtype-labels", str(labels)], "MR"),
        ([str(ct), "--encoder", str(labels)], "--subtype-labels"),
        ([str(ct), "--subtype-model", str(labels)], "not a safetensors file"),
    ]
    for argv, message in cases:
        assert main(["emphysema", *argv, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
