"""DICOM slices whose element lengths run past the end of the file are skipped before GDCM
reads them: GDCM allocates a declared length (up to 4 GB) before it finds the file too short.
Series written with pydicom, then byte-edited (issue 24)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import real_data
from dicom_writer import DicomSeries, write_ct_series
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume
from napari_fewlabel.io.dicom_guard import element_lengths_fit, length_problem

pydicom = pytest.importorskip("pydicom")

PIXEL_SPACING_LE = b"\x28\x00\x30\x00DS"  # (0028,0030) in explicit VR little endian
CODE_VALUE_LE = b"\x08\x00\x00\x01SH"  # (0008,0100)
PIXEL_DATA_LE = b"\xe0\x7f\x10\x00OW"  # (7FE0,0010)


@pytest.fixture
def series(tmp_path) -> DicomSeries:
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(5, 16, 16)).astype(np.float32)
    return write_ct_series(
        tmp_path / "ct", hu, first_position=np.zeros(3), pixel_spacing=(0.8, 0.8),
        slice_step_mm=2.0,
    )  # fmt: skip


def _files_by_position(series: DicomSeries) -> list[Path]:
    files = sorted(series.folder.iterdir())
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [files[i] for i in np.argsort(z)]


def _middle(series: DicomSeries) -> Path:
    """The slice whose loss leaves a gap (not the first or last)."""
    files = _files_by_position(series)
    return files[len(files) // 2]


def _edit(path: Path, find: bytes, at: int, new: bytes) -> None:
    data = path.read_bytes()
    i = data.find(find)
    assert i >= 0, find
    path.write_bytes(data[: i + at] + new + data[i + at + len(new) :])


def _gdcm_reads(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


def _load_in_child(folder: Path) -> tuple[str, float]:
    """Load ``folder`` in a fresh process: (what it printed, its peak resident memory in MB).

    The child reports its own VmHWM: getrusage's ru_maxrss survives exec, so it would carry
    this (pytest) process's peak, over 1 GB late in a full run."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from napari_fewlabel.errors import FewLabelError\n"
        "from napari_fewlabel.io import load_volume\n"
        "try:\n"
        "    print('loaded', load_volume(Path(sys.argv[1])).shape)\n"
        "except FewLabelError as exc:\n"
        "    print('refused', exc)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print('VmHWM', int(hwm.split()[1]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, env=env
    )
    out = child.stdout.read().decode()
    child.stdout.close()
    child.wait()
    assert child.returncode == 0, out
    text, _, hwm = out.rpartition("VmHWM ")
    return text, int(hwm) / 1024


# ---------------------------------------------------------------- valid files pass
def test_a_valid_series_passes_every_file_and_loads(series):
    for path in series.folder.iterdir():
        assert length_problem(path) is None
        assert element_lengths_fit(path)
    scan = load_volume(series.folder)
    assert scan.shape == series.hu.shape


def test_pydicom_test_files_are_refused_only_where_gdcm_fails_too():
    """No false alarm on real files of every transfer syntax (implicit, big endian, JPEG,
    RLE, deflated, sequences, private and UN sequences); the ones refused are truncated."""
    folder = real_data.pydicom_tests()
    refused = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and length_problem(path) is not None:
            refused.append(path.name)
            assert not _gdcm_reads(path), path.name
    assert {"MR_truncated.dcm", "rtplan_truncated.dcm"} <= set(refused)
    assert len(refused) <= 4, refused


def test_files_without_preamble_are_left_to_gdcm(tmp_path):
    path = tmp_path / "raw"
    path.write_bytes(b"\x08\x00\x16\x00" + struct.pack("<I", 0xFFFFFFF0))
    assert length_problem(path) is None
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert length_problem(empty) is None
    assert length_problem(tmp_path / "absent") is None


# ---------------------------------------------------------------- lengths past the end
def test_a_length_past_the_end_skips_the_slice_with_a_gap_and_little_memory(series):
    """The fuzzer's case: a garbled VR makes GDCM read the element as implicit VR, whose
    4-byte length (here 805 MB) it allocated before failing."""
    middle = _middle(series)
    _edit(middle, PIXEL_SPACING_LE, 4, struct.pack("<I", 0x30000000))
    reason = length_problem(middle)
    assert reason is not None and "(0028,0030)" in reason and "past the end" in reason
    for path in series.folder.iterdir():
        assert (length_problem(path) is None) == (path != middle)

    out, peak_mb = _load_in_child(series.folder)
    assert out.startswith("refused") and "not evenly spaced" in out and "missing" in out, out
    assert peak_mb < 500, f"peak {peak_mb:.0f} MB"
    with pytest.raises(FewLabelError, match=r"not evenly spaced.*missing"):
        load_volume(series.folder)


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF, 10_000])
def test_a_pixel_data_length_past_the_end_is_refused(series, length):
    middle = _middle(series)
    _edit(middle, PIXEL_DATA_LE, 8, struct.pack("<I", length))
    assert "(7FE0,0010)" in length_problem(middle)
    assert not element_lengths_fit(middle)


def test_a_pixel_data_length_that_fits_passes(series):
    """Trailing bytes after the pixel data (padding) are no damage."""
    middle = _middle(series)
    middle.write_bytes(middle.read_bytes() + b"\x00" * 100)
    assert length_problem(middle) is None


def test_a_length_after_the_pixel_data_is_refused(series):
    """GDCM reads on past the pixel data, and allocates a length it finds there."""
    middle = _middle(series)
    data = middle.read_bytes()
    middle.write_bytes(data + b"\x10\x00\x20\x00" + struct.pack("<I", 2**20))
    assert "(0010,0020)" in length_problem(middle)
    assert not _gdcm_reads(middle)


def test_a_truncated_slice_is_refused(series):
    middle = _middle(series)
    middle.write_bytes(middle.read_bytes()[:-10])
    assert "(7FE0,0010)" in length_problem(middle)


# ---------------------------------------------------------------- sequences
def _add_nested_sequence(path: Path, *, undefined: bool, implicit: bool = False) -> None:
    """Add ReferencedImageSequence > item > PurposeOfReferenceCodeSequence > item."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    ds = pydicom.dcmread(path)
    code = Dataset()
    code.CodeValue = "121311"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Localizer"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([item])
    if undefined:
        for element, items in (("ReferencedImageSequence", [item]),
                               ("PurposeOfReferenceCodeSequence", [code])):  # fmt: skip
            owner = ds if element == "ReferencedImageSequence" else item
            owner[element].is_undefined_length = True
            for each in items:
                each.is_undefined_length_sequence_item = True
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-length", "defined-length"])
def test_nested_sequences_are_walked(series, undefined):
    middle = _middle(series)
    _add_nested_sequence(middle, undefined=undefined)
    data = middle.read_bytes()
    sq = data.find(b"\x08\x00\x40\x11SQ\x00\x00")  # (0008,1140) ReferencedImageSequence
    declared = struct.unpack_from("<I", data, sq + 8)[0]
    assert (declared == 0xFFFFFFFF) == undefined
    if undefined:
        assert b"\xfe\xff\x0d\xe0" in data and b"\xfe\xff\xdd\xe0" in data  # delimiters
    assert length_problem(middle) is None
    assert load_volume(series.folder).shape == series.hu.shape

    # A length inside the inner item, past the end: found only by descending into both.
    _edit(middle, CODE_VALUE_LE, 6, struct.pack("<H", 0xFFFF))
    assert "(0008,0100)" in length_problem(middle)


def test_an_item_length_past_the_end_is_refused(series):
    middle = _middle(series)
    _add_nested_sequence(middle, undefined=False)
    data = middle.read_bytes()
    item = data.find(b"\xfe\xff\x00\xe0")
    middle.write_bytes(data[: item + 4] + struct.pack("<I", 0x7FFFFFF0) + data[item + 8 :])
    assert "(FFFE,E000)" in length_problem(middle)


def test_deep_nesting_is_left_to_gdcm(tmp_path, series):
    """Thousands of nested undefined-length sequences: the walk gives up at its depth limit."""
    middle = _middle(series)
    data = middle.read_bytes()
    at = data.find(PIXEL_SPACING_LE)
    nest = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    middle.write_bytes(data[:at] + nest * 5000 + data[at:])
    assert length_problem(middle) is None  # undecided: GDCM judges


# ---------------------------------------------------------------- other transfer syntaxes
def test_an_implicit_vr_series_passes_and_loads(series):
    from pydicom.uid import ImplicitVRLittleEndian

    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        assert length_problem(path) is None
    scan = load_volume(series.folder)
    assert scan.shape == series.hu.shape


def test_an_implicit_vr_sequence_is_walked(series):
    """Implicit VR has no SQ marker: a value that starts with an item tag is walked as one."""
    middle = _middle(series)
    _add_nested_sequence(middle, undefined=False, implicit=True)
    assert length_problem(middle) is None
    data = middle.read_bytes()
    code = data.find(b"\x08\x00\x00\x01")  # (0008,0100), implicit: a 4-byte length follows
    middle.write_bytes(data[: code + 4] + struct.pack("<I", 0x00FFFFFF) + data[code + 8 :])
    assert "(0008,0100)" in length_problem(middle)
