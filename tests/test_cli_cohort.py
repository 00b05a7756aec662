"""`fewlabel predict SCAN... --out-dir DIR`: cohorts of real scans, resuming, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import real_data
from napari_fewlabel.cli import main
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.cohort import SUMMARY_CSV, SUMMARY_JSON, find_scans
from napari_fewlabel.io import load_volume, read_mask_info
from napari_fewlabel.io.atomic import TEMP_MARK
from napari_fewlabel.io.dicom import list_dicom_series, read_dicom_series
from napari_fewlabel.models.checkpoint import save_checkpoint
from tiny_model import make_model

CLASSES = ("class 1", "class 2")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    model = make_model(num_classes=3)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors",
                           model.network, model.card)  # fmt: skip


@pytest.fixture(scope="module")
def lung_crop(tmp_path_factory) -> Path:
    """lung1 CT cropped to 48x96x96 voxels around the mediastinum, as NRRD."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(real_data.lung1_image()))
    path = tmp_path_factory.mktemp("lung") / "lung1 crop.nrrd"  # a space: names made safe
    sitk.WriteImage(image[200:296, 200:296, :], str(path))
    return path


@pytest.fixture(scope="module")
def scans(lung_crop) -> list[Path]:
    """Three real scans: MRI NIfTI (ITK T1, nibabel anatomical) and CT NRRD (lung1 crop)."""
    return [real_data.itk_t1(), real_data.nibabel_anatomical(), lung_crop]


@pytest.fixture(scope="module")
def study(lung_crop, tmp_path_factory) -> Path:
    """A study folder of lung1 crops as DICOM: two CT series and a one-image localizer."""
    import SimpleITK as sitk

    pytest.importorskip("pydicom")
    from dicom_writer import write_ct_series

    image = sitk.ReadImage(str(lung_crop))
    hu = sitk.GetArrayFromImage(image)
    origin, (sx, sy, sz) = np.asarray(image.GetOrigin()), image.GetSpacing()
    folder = tmp_path_factory.mktemp("dicom") / "study"
    for sub, number, description, part in (
        ("a", 2, "Chest CT", hu[:12]),
        ("b", 3, "Chest CT/thin", hu[12:32]),
        ("c", 1, "Localizer", hu[:1, ::4, ::4]),
    ):
        write_ct_series(folder / sub, part, first_position=origin, pixel_spacing=(sy, sx),
                        slice_step_mm=sz, series_number=number, description=description)  # fmt: skip
    return folder


def _run(*args: object) -> int:
    return main(["predict", *map(str, args), "--device", "cpu"])


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_JSON).read_text())


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / SUMMARY_CSV, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if TEMP_MARK in p.name]


def test_three_scans_and_a_corrupt_one(model_path, scans, tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "masks"  # created by the run
    assert _run(model_path, scans[0], bad, *scans[1:], "--out-dir", out) == 2
    captured = capsys.readouterr()
    assert "4 scans: 3 segmented, 0 skipped, 1 failed" in captured.out
    assert f"{bad}: Could not read broken.nii.gz" in captured.err  # the list of failures
    assert "4/4" in captured.err  # the progress bar ran over every scan

    summary = _summary(out)
    assert (summary["scans"], summary["done"], summary["failed"]) == (4, 3, 1)
    rows = summary["results"]
    assert [r["status"] for r in rows] == ["done", "failed", "done", "done"]
    assert rows[1]["scan"] == str(bad) and "export it again" in rows[1]["reason"]
    assert rows[1]["mask"] == ""
    names = ["KmeansTest_T1UCharRaw_mask.nii.gz", "anatomical_mask.nii.gz",
             "lung1_crop_mask.nii.gz"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, SUMMARY_CSV, SUMMARY_JSON])
    for scan, row, name in zip(scans, (rows[0], rows[2], rows[3]), names, strict=True):
        image, mask = load_volume(scan), load_volume(out / name)
        assert row["mask"] == str(out / name)
        assert mask.shape == image.shape == tuple(row["shape"])
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        info = read_mask_info(out / name)
        assert info is not None and [c["name"] for c in info.classes][1:] == list(CLASSES)
    table = _csv(out)
    assert [r["status"] for r in table] == ["done", "failed", "done", "done"]
    assert list(table[0])[:7] == ["scan", "mask", "status", "reason", "rank", "shape", "spacing_mm"]
    assert {"class 1_voxels", "class 2_voxels", "class 1_mL", "class 2_mL", "seconds"} <= set(
        table[0]
    )
    assert table[0]["shape"] == "128x62x128" and table[0]["spacing_mm"] == "2x3x2"


def test_volumes_in_ml_are_voxels_times_the_voxel_volume(model_path, scans, tmp_path):
    out = tmp_path / "out"
    assert _run(model_path, *scans, "--out-dir", out) == 0
    for row, table_row, scan in zip(_summary(out)["results"], _csv(out), scans, strict=True):
        mask, image = load_volume(row["mask"]), load_volume(scan)
        counts = np.bincount(mask.array.ravel(), minlength=3)
        voxel_ml = float(np.prod(image.spacing_mm)) / 1000
        np.testing.assert_allclose(row["spacing_mm"], image.spacing_mm, rtol=1e-6)
        for k, name in enumerate(CLASSES, start=1):
            assert row["voxels"][name] == counts[k]
            assert int(table_row[f"{name}_voxels"]) == counts[k]
            assert row["ml"][name] == pytest.approx(counts[k] * voxel_ml, rel=1e-6)
            assert float(table_row[f"{name}_mL"]) == pytest.approx(counts[k] * voxel_ml, abs=1e-6)
        assert sum(row["voxels"].values()) > 0  # something to measure in every scan


def test_a_rerun_skips_done_scans_and_redoes_a_deleted_mask(model_path, scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(model_path, *scans, "--out-dir", out) == 0
    masks = [Path(r["mask"]) for r in _summary(out)["results"]]
    first = [m.stat().st_mtime_ns for m in masks]
    before = _summary(out)["results"]
    masks[1].unlink()
    # A mask of another scan under a scan's name does not fit it: predicted again.
    shutil.copy(masks[0], masks[2])
    capsys.readouterr()
    assert _run(model_path, *scans, "--out-dir", out) == 0
    assert "3 scans: 2 segmented, 1 skipped, 0 failed" in capsys.readouterr().out
    after = _summary(out)["results"]
    assert [(r["status"], r["reason"]) for r in after] == [
        ("skipped", "mask exists"), ("done", ""), ("done", "")
    ]  # fmt: skip
    assert masks[0].stat().st_mtime_ns == first[0]
    assert all(m.is_file() for m in masks)
    assert load_volume(masks[2]).shape == load_volume(scans[2]).shape
    # A skipped scan is still measured (from its mask), so the summary covers the cohort.
    assert after[0]["voxels"] == before[0]["voxels"] and after[0]["ml"] == before[0]["ml"]
    assert _no_temp_files(out)


def test_a_list_file(model_path, scans, tmp_path):
    (tmp_path / "data").mkdir()
    local = shutil.copy(scans[1], tmp_path / "data" / "local.nii")
    listing = tmp_path / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text(
        f"# three scans\n{scans[0]}\n\n   ../data/local.nii  \n# {scans[2]}\n{scans[2]}\n"
        f"{scans[0]}\n"  # listed twice: predicted once
    )
    out = tmp_path / "out"
    assert _run(model_path, listing, "--out-dir", out) == 0
    rows = _summary(out)["results"]
    assert [r["scan"] for r in rows] == [str(scans[0]), str(local), str(scans[2])]
    assert {r["status"] for r in rows} == {"done"}


def test_a_folder_of_scan_files_gives_each_of_them(model_path, scans, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, scan in enumerate(scans[:2]):
        shutil.copy(scan, folder / f"{i}_{Path(scan).name}")
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    assert _run(model_path, folder, "--out-dir", out) == 0
    rows = _summary(out)["results"]
    assert [Path(r["mask"]).name for r in rows] == [
        "0_KmeansTest_T1UCharRaw_mask.nii.gz", "1_anatomical_mask.nii.gz"
    ]  # fmt: skip


def test_a_study_folder_gives_a_mask_per_series(model_path, study, tmp_path, capsys):
    series = list_dicom_series(study)
    assert [(s.number, s.description, s.images) for s in series] == [
        ("1", "Localizer", 1), ("2", "Chest CT", 12), ("3", "Chest CT/thin", 20)
    ]  # fmt: skip
    assert read_dicom_series(study, series[1].uid).shape[0] == 12
    assert read_dicom_series(study).shape[0] == 20  # without a UID: the largest, as before

    out = tmp_path / "out"
    assert _run(model_path, study, "--out-dir", out) == 0
    rows = _summary(out)["results"]
    assert [(r["status"], Path(r["mask"]).name if r["mask"] else "") for r in rows] == [
        ("skipped", ""),
        ("done", "study_s2_Chest_CT_mask.nii.gz"),
        ("done", "study_s3_Chest_CT_thin_mask.nii.gz"),
    ]
    assert "localizer" in rows[0]["reason"]
    assert rows[1]["scan"] == f"{study} [#2 Chest CT]"
    assert [r["shape"][0] for r in rows[1:]] == [12, 20]
    # Resuming reads the series' headers only to check the masks still fit.
    assert _run(model_path, study, "--out-dir", out) == 0
    assert [r["status"] for r in _summary(out)["results"]] == ["skipped"] * 3


def test_a_real_dicom_study_with_a_scout(model_path, tmp_path):
    """pydicom's test study 98892001: a one-image scout and a 5-slice calcium-score CT."""
    study = real_data.pydicom_tests() / "dicomdirtests" / "98892001"
    out = tmp_path / "out"
    assert _run(model_path, study, "--out-dir", out) == 0
    rows = _summary(out)["results"]
    assert [r["status"] for r in rows] == ["skipped", "done"]
    assert Path(rows[1]["mask"]).name == "98892001_s5_SmartScore_-_Gated_0.5_sec_mask.nii.gz"
    assert tuple(rows[1]["shape"]) == read_dicom_series(study, None).shape == (5, 16, 16)


def test_seg_masks_of_a_study_match_the_nifti_masks_and_resume(
    model_path, study, scans, tmp_path, capsys
):
    """--format seg: a DICOM SEG per series on the NIfTI run's voxels; a NIfTI scan fails."""
    import pydicom

    from napari_fewlabel.io.dicom_seg import read_dicom_seg

    nifti_out, seg_out = tmp_path / "nifti", tmp_path / "seg"
    assert _run(model_path, study, "--out-dir", nifti_out) == 0
    assert _run(model_path, study, scans[1], "--out-dir", seg_out, "--format", "seg") == 2
    assert "1 failed" in capsys.readouterr().out
    rows = _summary(seg_out)["results"]
    assert [r["status"] for r in rows] == ["skipped", "done", "done", "failed"]
    assert "not a DICOM series" in rows[3]["reason"] and "--format nifti" in rows[3]["reason"]
    assert [Path(r["mask"]).name for r in rows[1:3]] == [
        "study_s2_Chest_CT_seg.dcm", "study_s3_Chest_CT_thin_seg.dcm"
    ]  # fmt: skip
    nifti_rows = _summary(nifti_out)["results"]
    for info, row, nifti_row in zip(list_dicom_series(study)[1:], rows[1:3], nifti_rows[1:],
                                    strict=True):  # fmt: skip
        scan = read_dicom_series(study, info.uid)
        seg = pydicom.dcmread(row["mask"])
        assert seg.Modality == "SEG"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.uid
        assert [s.SegmentLabel for s in seg.SegmentSequence] == list(CLASSES)
        assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
        np.testing.assert_array_equal(
            read_dicom_seg(row["mask"], scan), load_volume(nifti_row["mask"]).array
        )
        assert row["voxels"] == nifti_row["voxels"] and row["ml"] == nifti_row["ml"]
    first = Path(rows[1]["mask"]).stat().st_mtime_ns
    Path(rows[2]["mask"]).write_bytes(b"DICM half a file")  # a damaged SEG is redone
    assert _run(model_path, study, "--out-dir", seg_out, "--format", "seg") == 0
    again = _summary(seg_out)["results"]
    assert [(r["status"], r["reason"]) for r in again] == [
        ("skipped", again[0]["reason"]), ("skipped", "mask exists"), ("done", "")
    ]  # fmt: skip
    assert Path(rows[1]["mask"]).stat().st_mtime_ns == first
    assert again[1]["voxels"] == rows[1]["voxels"]  # measured from the SEG read back
    assert pydicom.dcmread(rows[2]["mask"]).Modality == "SEG"
    assert _no_temp_files(seg_out)


def test_one_dicom_scan_to_a_seg_file(model_path, study, tmp_path, capsys):
    from napari_fewlabel.io.dicom_seg import read_dicom_seg

    folder = study / "b"  # one series
    out = tmp_path / "mask.dcm"
    assert _run(model_path, folder, "--out", out) == 0
    assert "Wrote" in capsys.readouterr().out
    nifti = tmp_path / "mask.nii.gz"
    assert _run(model_path, folder, "--out", nifti) == 0
    np.testing.assert_array_equal(
        read_dicom_seg(out, load_volume(folder)), load_volume(nifti).array
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dicom}", "--out", "{tmp}/m.nii.gz", "--format", "seg"], "does not match --out"),
        (["{dicom}", "--out", "{tmp}/m.dcm", "--format", "nifti"], "does not match --out"),
        (["{nifti}", "--out", "{tmp}/m.dcm"], "is not a DICOM series"),
        (["{nifti}", "--out", "{tmp}/m.seg"], ".nii.gz"),
    ],
)
def test_seg_user_errors(args, message, model_path, scans, study, tmp_path, capsys):
    filled = [a.format(dicom=study / "a", nifti=scans[1], tmp=tmp_path) for a in args]
    assert main(["predict", str(model_path), *filled]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_mask_names_are_safe_and_unique(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "scan.nii.gz").write_bytes(b"x")
    (tmp_path / "a" / "Scan.nrrd").write_bytes(b"x")
    (tmp_path / "a" / "ct (1)+.mha").write_bytes(b"x")
    found = find_scans(
        [tmp_path / "a/scan.nii.gz", tmp_path / "b/scan.nii.gz", tmp_path / "a/Scan.nrrd",
         tmp_path / "a/ct (1)+.mha", tmp_path / "a/scan.nii.gz", tmp_path / "missing.nii"]
    )  # fmt: skip
    assert [s.name for s in found] == ["scan", "scan-2", "Scan-3", "ct_1", "missing"]
    assert found[-1].problem and "No file or folder" in found[-1].problem


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{scan}", "{scan}", "--out", "{tmp}/m.nii.gz"], "2 scans need --out-dir"),
        (["{scan}"], "--out mask.nii.gz for one scan, or --out-dir"),
        (["{tmp}/list.txt", "--out", "{tmp}/m.nii.gz"], "is a list of scans"),
        (["{scan}", "--out-dir", "{tmp}/file.txt"], "is a file: give --out-dir a folder"),
        (["{tmp}/nothing.txt", "--out-dir", "{tmp}/out"], "Cannot read the list file"),
        (["{tmp}/empty.txt", "--out-dir", "{tmp}/out"], "name no scan"),
    ],
)
def test_user_errors(args, message, model_path, scans, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "list.txt").write_text(f"{scans[1]}\n")
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    filled = [a.format(scan=scans[1], tmp=tmp_path) for a in args]
    assert main(["predict", str(model_path), *filled]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_and_out_dir_are_exclusive(model_path, scans, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(model_path), str(scans[1]), "--out", "m.nii.gz", "--out-dir", "d"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_list_that_lists_itself_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("b.txt\n")
    (tmp_path / "b.txt").write_text("a.txt\n")
    with pytest.raises(FewLabelError, match="lists itself"):
        find_scans([tmp_path / "a.txt"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_under_torchrun(model_path, scans, study, tmp_path):
    """Each rank predicts its share once; rank 0 alone writes the merged summary and prints."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", "-m", "napari_fewlabel.cli", "predict",
        str(model_path), *map(str, scans), str(study), "--out-dir", str(out), "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("scans:") == 1  # rank 0 reports, rank 1 prints nothing
    assert "6 scans: 5 segmented, 1 skipped, 0 failed" in result.stdout
    assert "in 2 processes" in result.stdout
    summary = _summary(out)
    assert summary["processes"] == 2
    rows = summary["results"]
    assert [r["index"] for r in rows] == list(range(6))  # each scan once, in order
    assert [r["rank"] for r in rows] == [0, 1, 0, 1, 0, 1]
    masks = [Path(r["mask"]) for r in rows if r["mask"]]
    assert len(set(masks)) == 5 and all(m.is_file() for m in masks)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [m.name for m in masks] + [SUMMARY_CSV, SUMMARY_JSON]
    )  # no temporary file left, nothing else written
    assert [r["rank"] for r in _csv(out)] == ["0", "1", "0", "1", "0", "1"]
