"""DICOM SEG export: voxels, geometry and references checked against the source slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import real_data
from dicom_writer import DicomSeries, write_ct_series
from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import Volume, load_volume, save_labels
from napari_fewlabel.io.atomic import TEMP_MARK
from napari_fewlabel.io.dicom import read_dicom_header
from napari_fewlabel.io.dicom_seg import (
    read_dicom_seg,
    read_segment_labels,
    segment_labels,
    write_dicom_seg,
)
from napari_fewlabel.io.volume import RAS_FROM_LPS

CLASSES = named_classes(["background", "liver", "tumour", "vessel"])

_ANGLE = np.deg2rad(20)
# name -> (row cosines, column cosines): how the slices lie in the patient.
ORIENTATIONS = {
    # columns toward L, rows toward P, slices toward S: the display orientation itself.
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    # rows toward A and normal toward I: the display flips rows and slices.
    "axial flipped": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    # columns toward P, rows toward I: the display transposes and flips.
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": ((np.cos(_ANGLE), np.sin(_ANGLE), 0.0), (-np.sin(_ANGLE), np.cos(_ANGLE), 0.0)),
}


def _series(folder: Path, orientation: str = "axial", *, seed: int = 0) -> DicomSeries:
    row_cos, col_cos = ORIENTATIONS[orientation]
    hu = np.random.default_rng(seed).integers(-1000, 1000, size=(7, 12, 10)).astype(np.int16)
    return write_ct_series(
        folder,
        hu,
        first_position=np.array([-50.0, 20.0, 100.0]),
        pixel_spacing=(0.8, 0.6),
        slice_step_mm=2.5,
        row_cosines=row_cos,
        col_cosines=col_cos,
        seed=seed,
    )


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Two classes at asymmetric places (no flip or transpose maps the mask onto itself);
    class 3 is named but absent."""
    labels = np.zeros(shape, np.uint8)
    labels[1, 2:5, 1:4] = 1
    labels[1, 2, 1] = 2
    labels[-2, -3, -2] = 2
    labels[3, 0, shape[2] // 2 :] = 1
    return labels


def _seg_world_voxels(seg_path: Path) -> dict[tuple[float, float, float], int]:
    """LPS mm of every set pixel of a SEG -> its segment, from the SEG's own plane positions."""
    ds = pydicom.dcmread(seg_path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orient = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
    n = ds.Rows * ds.Columns
    out: dict[tuple[float, float, float], int] = {}
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame = bits[f * n : (f + 1) * n].reshape(ds.Rows, ds.Columns)
        origin = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for r, c in np.argwhere(frame):
            lps = origin + c * col_mm * orient[:3] + r * row_mm * orient[3:]
            out[tuple(np.round(lps, 2))] = segment
    return out


def _display_world_voxels(labels: np.ndarray, like: Volume) -> dict[tuple[float, ...], int]:
    out = {}
    for zyx in np.argwhere(labels):
        lps = (RAS_FROM_LPS @ like.affine @ np.r_[zyx, 1.0])[:3]
        out[tuple(np.round(lps, 2))] = int(labels[tuple(zyx)])
    return out


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_seg_round_trip_matches_the_labels_and_the_nifti_export(tmp_path, orientation):
    series = _series(tmp_path / "ct", orientation)
    scan = load_volume(series.folder)
    labels = _labels(scan.shape)

    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    from_seg = read_dicom_seg(seg_path, scan)
    assert from_seg.dtype == np.uint8
    assert np.array_equal(from_seg, labels)

    nifti = save_labels(labels, like=scan, path=tmp_path / "mask.nii.gz")
    assert np.array_equal(load_volume(nifti).array, from_seg)

    # Independent of our mapping: each set SEG pixel, placed by the SEG's own plane
    # positions, is where the Volume's affine puts the labelled voxel.
    assert _seg_world_voxels(seg_path) == _display_world_voxels(labels, scan)


@pytest.mark.parametrize("orientation", ["sagittal", "oblique"])
def test_reading_needs_the_scan_header_only(tmp_path, orientation):
    """Resuming a cohort reads a SEG back on the series' header, without its pixels."""
    series = _series(tmp_path / "ct", orientation)
    scan = load_volume(series.folder)
    labels = _labels(scan.shape)
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    header = read_dicom_header(series.folder)
    assert np.array_equal(read_dicom_seg(seg_path, header), labels)
    assert read_segment_labels(seg_path) == segment_labels(CLASSES) == ("liver", "tumour", "vessel")


def test_a_damaged_seg_is_a_clear_error(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    seg_path = write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)
    seg_path.write_bytes(seg_path.read_bytes()[:300])  # cut short, as by a full disk
    with pytest.raises(FewLabelError, match=r"Cannot read .*seg\.dcm as a DICOM SEG"):
        read_dicom_seg(seg_path, scan)
    (tmp_path / "not.dcm").write_bytes(b"no DICOM here")
    with pytest.raises(FewLabelError, match="choose a segmentation file"):
        read_segment_labels(tmp_path / "not.dcm")


@pytest.mark.parametrize("orientation", ["axial", "axial flipped"])
def test_each_frame_references_the_slice_it_lies_on(tmp_path, orientation):
    series = _series(tmp_path / "ct", orientation)
    scan = load_volume(series.folder)
    seg_path = write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)

    position_of = {
        str(ds.SOPInstanceUID): np.array(ds.ImagePositionPatient, float)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in series.folder.iterdir())
    }
    seg = pydicom.dcmread(seg_path)
    assert seg.NumberOfFrames > 0
    for group in seg.PerFrameFunctionalGroupsSequence:
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame_position = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position_of[str(source.ReferencedSOPInstanceUID)], frame_position)


def test_seg_references_the_source_series_study_and_frame(tmp_path):
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    seg_path = write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.folder.iterdir()]
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != scan.header["SeriesInstanceUID"]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == scan.header["SeriesInstanceUID"]
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == {
        str(ds.SOPInstanceUID) for ds in sources
    }


def test_segments_are_the_classes_numbered_by_class_index(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    labels = _labels(scan.shape)
    assert 3 not in labels  # "vessel" is named but not painted
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    seg = hd.seg.segread(seg_path)

    assert seg.segment_numbers == [1, 2, 3]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == [
        "liver",
        "tumour",
        "vessel",
    ]
    ds = pydicom.dcmread(seg_path)
    for item, cls in zip(ds.SegmentSequence, CLASSES[1:], strict=True):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # SCT Tissue
        assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        lab = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue)
        assert np.allclose(lab.to_rgb(), cls.color, atol=2)


def test_classes_as_mask_info_mappings_and_manual_algorithm(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    labels = _labels(scan.shape)
    mappings = [c.to_dict() for c in CLASSES[:3]]  # MaskInfo.classes holds these
    seg_path = write_dicom_seg(
        labels, scan, tmp_path / "seg.dcm", mappings, algorithm_type="MANUAL"
    )
    assert np.array_equal(read_dicom_seg(seg_path, scan), labels)
    ds = pydicom.dcmread(seg_path)
    assert [i.SegmentLabel for i in ds.SegmentSequence] == ["liver", "tumour"]
    assert {i.SegmentAlgorithmType for i in ds.SegmentSequence} == {"MANUAL"}


def test_an_all_background_mask_is_written_as_empty_segments(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    labels = np.zeros(scan.shape, np.uint8)
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    assert np.array_equal(read_dicom_seg(seg_path, scan), labels)


def test_real_series_sorted_against_instance_number(tmp_path):
    """CT5N (pydicom's test files): InstanceNumber rises while the position falls."""
    folder = real_data.pydicom_tests() / "dicomdirtests/98892001/CT5N"
    scan = load_volume(folder)
    labels = _labels(scan.shape)
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    assert np.array_equal(read_dicom_seg(seg_path, scan), labels)
    assert _seg_world_voxels(seg_path) == _display_world_voxels(labels, scan)


def test_the_source_folder_can_move(tmp_path):
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    moved = tmp_path / "archive" / "ct"
    moved.parent.mkdir()
    shutil.move(series.folder, moved)
    labels = _labels(scan.shape)
    with pytest.raises(FewLabelError, match=r"folder .* is missing"):
        write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES, source_folder=moved)
    assert np.array_equal(read_dicom_seg(seg_path, scan, source_folder=moved), labels)


# ------------------------------------------------------------------ refused input
def test_a_scan_not_read_from_dicom_is_refused(tmp_path):
    scan = Volume.from_array(np.zeros((4, 5, 6), np.int16), modality="CT")
    with pytest.raises(FewLabelError, match="needs a scan read from a DICOM series; export NIfTI"):
        write_dicom_seg(np.zeros(scan.shape, np.uint8), scan, tmp_path / "seg.dcm", CLASSES)
    assert not list(tmp_path.iterdir())


def test_a_nifti_scan_is_refused(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    nifti = load_volume(save_labels(_labels(scan.shape), like=scan, path=tmp_path / "m.nii.gz"))
    with pytest.raises(FewLabelError, match="export NIfTI instead"):
        write_dicom_seg(_labels(scan.shape), nifti, tmp_path / "seg.dcm", CLASSES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop the top slice", "changed since the scan was opened"),
        ("drop a middle slice", "cannot be read again.*not evenly spaced"),
        ("another series", "not the series|No DICOM series"),
    ],
)
def test_changed_source_files_are_refused(tmp_path, change, message):
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    files = sorted(
        series.folder.iterdir(),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    if change == "drop the top slice":
        files[-1].unlink()
    elif change == "drop a middle slice":
        files[3].unlink()
    else:
        shutil.rmtree(series.folder)
        _series(series.folder, seed=1)
    with pytest.raises(FewLabelError, match=message):
        write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)
    assert not (tmp_path / "seg.dcm").exists()


def test_the_smaller_series_of_a_folder_read_by_its_uid(tmp_path):
    import inspect

    from napari_fewlabel.io.dicom import read_dicom_series

    if "series_uid" not in inspect.signature(read_dicom_series).parameters:
        pytest.skip("this reader reads only the largest series of a folder")
    _series(tmp_path / "study" / "big", seed=1)
    hu = np.random.default_rng(2).integers(-1000, 1000, size=(4, 12, 10)).astype(np.int16)
    small = write_ct_series(
        tmp_path / "study" / "small",
        hu,
        first_position=np.array([0.0, 0.0, 0.0]),
        pixel_spacing=(1.0, 1.0),
        slice_step_mm=3.0,
        series_number=5,
    )
    uid = pydicom.dcmread(next(small.folder.iterdir())).SeriesInstanceUID
    scan = read_dicom_series(tmp_path / "study", series_uid=uid)
    assert scan.shape == (4, 12, 10)
    labels = _labels(scan.shape)
    seg_path = write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    assert pydicom.dcmread(seg_path).ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert np.array_equal(read_dicom_seg(seg_path, scan), labels)


def test_a_moved_slice_is_refused(tmp_path):
    """Same files, same count, but the slices now lie elsewhere."""
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) + (5.0 if i == 0 else 0.0)
                                   for i, v in enumerate(ds.ImagePositionPatient)]  # fmt: skip
        ds.save_as(path)
    with pytest.raises(FewLabelError, match="changed since the scan was opened"):
        write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((7, 10, 12), np.uint8), r"shape \(7, 10, 12\) but the scan has"),
        (np.full((7, 12, 10), 4, np.uint8), "value 4 but only 3 classes"),
        (np.full((7, 12, 10), -1, np.int16), "negative"),
        (np.full((7, 12, 10), 0.5), "fractional"),
    ],
)
def test_labels_that_do_not_fit_are_refused(tmp_path, labels, message):
    scan = load_volume(_series(tmp_path / "ct").folder)
    assert scan.shape == (7, 12, 10)
    with pytest.raises(FewLabelError, match=message):
        write_dicom_seg(labels, scan, tmp_path / "seg.dcm", CLASSES)
    assert not (tmp_path / "seg.dcm").exists()


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (CLASSES[:1], "at least one class besides background"),
        ((CLASSES[0], CLASSES[2]), r"1, 2, 3, \.\.\. besides background, got \[2\]"),
        ((CLASSES[0], CLASSES[1], CLASSES[1]), "Two classes have index 1"),
    ],
)
def test_classes_that_cannot_be_segments_are_refused(tmp_path, classes, message):
    scan = load_volume(_series(tmp_path / "ct").folder)
    with pytest.raises(FewLabelError, match=message):
        write_dicom_seg(np.zeros(scan.shape, np.uint8), scan, tmp_path / "seg.dcm", classes)


def test_source_without_frame_of_reference_is_refused(tmp_path):
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with pytest.raises(FewLabelError, match=r"no FrameOfReferenceUID.*export the mask as NIfTI"):
        write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)


def test_anonymised_source_without_patient_details_is_written(tmp_path):
    """Type 2 attributes dropped by an anonymiser are written empty, as DICOM allows."""
    series = _series(tmp_path / "ct")
    scan = load_volume(series.folder)
    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PatientName, ds.PatientID
        ds.save_as(path)
    seg_path = write_dicom_seg(_labels(scan.shape), scan, tmp_path / "seg.dcm", CLASSES)
    assert pydicom.dcmread(seg_path).PatientID == ""


def test_unwritable_destination_leaves_nothing(tmp_path):
    scan = load_volume(_series(tmp_path / "ct").folder)
    with pytest.raises(FewLabelError, match="does not exist"):
        write_dicom_seg(_labels(scan.shape), scan, tmp_path / "nowhere" / "seg.dcm", CLASSES)
    with pytest.raises(FewLabelError, match="is a folder"):
        write_dicom_seg(_labels(scan.shape), scan, tmp_path, CLASSES)
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_reading_a_seg_of_another_series_is_refused(tmp_path):
    first = load_volume(_series(tmp_path / "a").folder)
    other = load_volume(_series(tmp_path / "b", seed=1).folder)
    seg_path = write_dicom_seg(_labels(first.shape), first, tmp_path / "seg.dcm", CLASSES)
    with pytest.raises(FewLabelError, match="segments another series"):
        read_dicom_seg(seg_path, other)
