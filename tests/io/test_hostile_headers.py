"""Headers that lie: huge sizes, decompression bombs, forged NRRD/MetaImage fields, data files
elsewhere on disk. Each must end in one FewLabelError sentence before a voxel is read: no
crash, no hang, no memory blow-up (issue 24)."""

from __future__ import annotations

import gzip
import io
import json
import os
import plistlib
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicom_writer import write_ct_series
from napari_fewlabel.cli import main
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import load_volume, read_scan_header
from napari_fewlabel.io.limits import ENV_MAX_VOLUME_GB, check_volume_size, max_volume_bytes

HUGE = (1290, 1290, 1290)  # 17.2 GB of float64, in a header of a few dozen bytes


@pytest.fixture
def limit_gb(monkeypatch):
    """Pin the memory limit so the tests do not depend on this machine's free memory."""

    def set_limit(gb: float) -> None:
        monkeypatch.setenv(ENV_MAX_VOLUME_GB, str(gb))

    set_limit(8)
    return set_limit


def _nifti_bytes(shape, dtype, data: bytes = b"", *, nifti2: bool = False) -> bytes:
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    offset = 544 if nifti2 else 352  # header, then 4 bytes of "no extension"
    header["vox_offset"] = offset
    block = header.binaryblock
    return block + b"\x00" * (offset - len(block)) + data


def _write(path: Path, text: str, data: bytes = b"") -> Path:
    path.write_bytes(text.encode() + data)
    return path


def _nrrd_text(sizes="4 5 6", **fields: str) -> str:
    lines = {"type": "short", "dimension": "3", "sizes": sizes, "encoding": "raw",
             "endian": "little", "spacings": "1 1 1"}  # fmt: skip
    lines.update({k.replace("_", " "): v for k, v in fields.items()})
    body = "".join(f"{k}: {v}\n" for k, v in lines.items() if v)
    return "NRRD0004\n" + body + "\n"


def _mha_text(dim_size="4 5 6", ndims="3", data_file="LOCAL", **fields: str) -> str:
    lines = {"ObjectType": "Image", "NDims": ndims, "BinaryData": "True",
             "BinaryDataByteOrderMSB": "False", "ElementSpacing": "1 1 1",
             "DimSize": dim_size, "ElementType": "MET_SHORT"}  # fmt: skip
    lines.update(fields)
    body = "".join(f"{k} = {v}\n" for k, v in lines.items() if v)
    return body + f"ElementDataFile = {data_file}\n"


VOXELS_456 = np.arange(120, dtype="<i2").tobytes()  # 4 x 5 x 6 int16


# ------------------------------------------------------------ positive controls
def test_hand_written_nrrd_and_metaimage_are_read(tmp_path):
    """The validator accepts the ordinary forms it must not break."""
    nrrd = load_volume(_write(tmp_path / "a.nrrd", _nrrd_text(), VOXELS_456))
    (tmp_path / "b.raw").write_bytes(b"junk" + VOXELS_456)
    nhdr = load_volume(_write(tmp_path / "b.nhdr", _nrrd_text(data_file="b.raw", byte_skip="-1")))
    mha = load_volume(_write(tmp_path / "c.mha", _mha_text(), VOXELS_456))
    (tmp_path / "d.raw").write_bytes(VOXELS_456)
    mhd = load_volume(_write(tmp_path / "d.mhd", _mha_text(data_file="d.raw")))
    four_d = load_volume(
        _write(tmp_path / "e.nrrd", _nrrd_text("4 5 6 1", dimension="4", spacings="1 1 1 1"),
               VOXELS_456)
    )  # fmt: skip
    for volume in (nrrd, nhdr, mha, mhd, four_d):
        assert volume.shape == (6, 5, 4)
        assert sorted(volume.array.ravel().tolist()) == list(range(120))


# -------------------------------------------------------------- memory limits
def test_limit_comes_from_the_environment_or_the_free_memory(monkeypatch):
    monkeypatch.setenv(ENV_MAX_VOLUME_GB, "2.5")
    assert max_volume_bytes() == 2_500_000_000
    monkeypatch.setenv(ENV_MAX_VOLUME_GB, "lots")
    with pytest.raises(FewLabelError, match=f"{ENV_MAX_VOLUME_GB}='lots' is not a size in GB"):
        max_volume_bytes()
    monkeypatch.delenv(ENV_MAX_VOLUME_GB)
    assert 0 < max_volume_bytes() < 2**62
    with pytest.raises(FewLabelError, match=r"would take 549\.8 GB"):
        check_volume_size((4096, 4096, 4096), 8, "scan.nii")


@pytest.mark.parametrize("kind", ["nrrd", "mha", "nifti2"])
def test_17_gb_header_in_a_tiny_file_is_refused(tmp_path, limit_gb, kind):
    # Compressed data: the file's size cannot tell the header is wrong (raw data would be
    # refused as truncated first), only the memory limit can.
    if kind == "nrrd":
        text = _nrrd_text("1290 1290 1290", type="double", encoding="gzip")
        path = _write(tmp_path / "x.nrrd", text, gzip.compress(b"\x00" * 1000))
    elif kind == "mha":
        text = _mha_text("1290 1290 1290", ElementType="MET_DOUBLE", CompressedData="True")
        path = _write(tmp_path / "x.mha", text, gzip.compress(b"\x00" * 1000))
    else:
        path = tmp_path / "x.nii"
        path.write_bytes(_nifti_bytes(HUGE, np.float64, nifti2=True))
    assert path.stat().st_size < 600
    for read in (load_volume, read_scan_header):
        with pytest.raises(FewLabelError) as caught:
            read(path)
        message = str(caught.value)
        assert "1290 x 1290 x 1290 float64" in message
        assert "limit of 8.0 GB" in message and ENV_MAX_VOLUME_GB in message


def test_huge_header_is_refused_with_the_default_limit(tmp_path, monkeypatch):
    """No environment variable: the limit comes from the machine, and 550 GB exceeds it."""
    monkeypatch.delenv(ENV_MAX_VOLUME_GB, raising=False)
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes((4096, 4096, 4096), np.float64)))
    with pytest.raises(FewLabelError, match=r"549\.8 GB of memory.*available now"):
        load_volume(path)


def _gzip_bomb_header(tmp_path: Path) -> Path:
    """A 1024^3 uint32 NIfTI header (4.3 GB of voxels) in a file of a few hundred bytes."""
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes((1024, 1024, 1024), np.uint32, b"\x00" * 4096)))
    return path


def test_info_describes_a_large_scan_from_its_header(tmp_path, limit_gb, capsys):
    limit_gb(100)
    bomb = _gzip_bomb_header(tmp_path)
    start = time.perf_counter()
    assert main(["info", str(bomb), "--json"]) == 0
    assert time.perf_counter() - start < 5
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [1024, 1024, 1024]
    assert info["dtype"] == "uint32"
    assert info["intensity_range"] is None
    assert info["voxels"].startswith("not read (4.3 GB to load")


def test_info_and_load_refuse_a_bomb_beyond_the_limit(tmp_path, limit_gb, capsys):
    limit_gb(2)
    bomb = _gzip_bomb_header(tmp_path)
    assert main(["info", str(bomb)]) == 2
    assert "would take 4.3 GB of memory to read" in capsys.readouterr().err
    with pytest.raises(FewLabelError, match="1024 x 1024 x 1024 uint32"):
        load_volume(bomb)


def test_gzip_with_more_data_than_the_header_declares(tmp_path, limit_gb):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes((10, 10, 10), np.int16, b"\x00" * 1_000_000)))
    with pytest.raises(FewLabelError, match="more voxel data than its header declares"):
        load_volume(path)


def test_gzip_with_less_data_than_the_header_declares(tmp_path, limit_gb):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes((10, 10, 10), np.int16, b"\x00" * 1000)))
    with pytest.raises(FewLabelError, match="truncated"):
        load_volume(path)


def test_nifti_whose_voxels_would_overlap_its_header(tmp_path):
    path = tmp_path / "x.nii"
    data = _nifti_bytes((4, 5, 6), np.int16, VOXELS_456)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data))
    header["vox_offset"] = 0
    path.write_bytes(header.binaryblock + data[348:])
    with pytest.raises(FewLabelError, match="vox_offset 0 lies inside its 348-byte header"):
        load_volume(path)


def test_hand_written_nifti_is_read(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes((4, 5, 6), np.int16, VOXELS_456)))
    assert load_volume(path).array.sum() == sum(range(120))


def test_nifti_with_a_dimension_of_size_zero(tmp_path):
    path = tmp_path / "x.nii"
    path.write_bytes(_nifti_bytes((10, 0, 10), np.int16))
    with pytest.raises(FewLabelError, match="has a dimension of size 0"):
        load_volume(path)


def test_invesalius_project_declaring_a_huge_volume(tmp_path, limit_gb):
    main_plist = plistlib.dumps({"matrix": {"shape": list(HUGE), "dtype": "float64",
                                            "filename": "matrix.dat"},
                                 "spacing": [1.0, 1.0, 1.0]})  # fmt: skip
    path = tmp_path / "big.inv3"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("main.plist", main_plist), ("matrix.dat", b"\x00" * 64)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    for read in (load_volume, read_scan_header):
        with pytest.raises(FewLabelError, match="1290 x 1290 x 1290 float64"):
            read(path)


# ------------------------------------------- forged NRRD / MetaImage headers
@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_mha_text("4 5 6", ndims="99999"), "declares 99999 dimensions"),
        (_mha_text("4 5 6", ndims="-1"), "declares -1 dimensions"),
        (_mha_text("4 5"), "declares 3 dimensions but 2 sizes"),
        (_mha_text("4 0 6"), "every size must be positive"),
        (_mha_text(ElementType="MET_STRING"), "ElementType 'MET_STRING' is not supported"),
        (_mha_text(data_file="LIST"), "spreads its voxels over several files"),
        (_mha_text(data_file="slice%03d.raw 1 6 1"), "spreads its voxels over several files"),
        (_mha_text(HeaderSize="-5"), "HeaderSize = -5 is not valid"),
        (_mha_text(BinaryData="False"), "stores its voxels as text"),
        (_mha_text(ElementNumberOfChannels="0"), "ElementNumberOfChannels = 0"),
        ("NDims = 3\nDimSize = 4 5 6\n", "no 'ElementDataFile = ...' line"),
    ],
)
def test_forged_metaimage_header(tmp_path, text, match):
    path = _write(tmp_path / "x.mha", text, VOXELS_456)
    with pytest.raises(FewLabelError, match=match):
        load_volume(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_nrrd_text(encoding="txt"), "stores its voxels as text"),
        (_nrrd_text(encoding="hex"), "stores its voxels as text"),
        (_nrrd_text(encoding="bzip2"), "'encoding: bzip2', which this reader does not support"),
        (_nrrd_text(data_file="LIST"), "spreads its voxels over several files"),
        (_nrrd_text(data_file="x%03d.raw 0 5 1"), "spreads its voxels over several files"),
        (_nrrd_text(line_skip="-5"), "'line skip: -5' is negative"),
        (_nrrd_text(encoding="gzip", byte_skip="-1"), "'byte skip: -1' is not valid for gzip"),
        (_nrrd_text(dimension="99999"), "declares 99999 dimensions"),
        (_nrrd_text(dimension="2", sizes="4 5"), "2D where a 3D scan is needed"),
        (_nrrd_text(type="block"), "voxel type 'block' is not supported"),
        (_nrrd_text(sizes="4 -5 6"), "every size must be positive"),
        (_nrrd_text(encoding=""), "no 'encoding:' field"),
        ("NRRD0004\ntype short\n\n", "is not 'field: value'"),
        ("PNG\nnot a nrrd\n\n", "not a NRRD file"),
    ],
)
def test_forged_nrrd_header(tmp_path, text, match):
    path = _write(tmp_path / "x.nrrd", text, VOXELS_456)
    with pytest.raises(FewLabelError, match=match):
        load_volume(path)


def test_data_file_dev_zero_with_negative_line_skip_neither_hangs_nor_crashes(tmp_path):
    path = _write(tmp_path / "x.nhdr", _nrrd_text(data_file="/dev/zero", line_skip="-5"))
    with pytest.raises(FewLabelError, match="negative"):
        load_volume(path)
    path = _write(tmp_path / "y.nhdr", _nrrd_text(data_file="/dev/zero"))
    with pytest.raises(FewLabelError, match="outside its own folder"):
        load_volume(path)


# ---------------------------------------------- data files outside the folder
@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
@pytest.mark.parametrize("target", ["/etc/passwd", "../secret.raw", "link.raw"])
def test_detached_header_cannot_read_files_elsewhere(tmp_path, suffix, target):
    (tmp_path / "secret.raw").write_bytes(VOXELS_456)
    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "link.raw").symlink_to(tmp_path / "secret.raw")
    text = _nrrd_text(data_file=target) if suffix == ".nhdr" else _mha_text(data_file=target)
    path = _write(folder / f"x{suffix}", text)
    for read in (load_volume, read_scan_header):
        with pytest.raises(FewLabelError, match="outside its own folder"):
            read(path)


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_data_file_that_is_not_a_regular_file(tmp_path, suffix):
    os.mkfifo(tmp_path / "pipe.raw")
    text = (
        _nrrd_text(data_file="pipe.raw") if suffix == ".nhdr" else _mha_text(data_file="pipe.raw")
    )
    with pytest.raises(FewLabelError, match="not a regular file"):
        load_volume(_write(tmp_path / f"x{suffix}", text))


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_raw_data_shorter_than_declared(tmp_path, suffix):
    short = VOXELS_456[:-10]
    if suffix == ".nrrd":
        path = _write(tmp_path / "x.nrrd", _nrrd_text(), short)
    elif suffix == ".mha":
        path = _write(tmp_path / "x.mha", _mha_text(), short)
    else:
        (tmp_path / "x.raw").write_bytes(short)
        text = _nrrd_text(data_file="x.raw") if suffix == ".nhdr" else _mha_text(data_file="x.raw")
        path = _write(tmp_path / f"x{suffix}", text)
    expected = r"holds 230 bytes of voxel data where the header declares 240 .*truncated"
    with pytest.raises(FewLabelError, match=expected):
        load_volume(path)


def test_gzip_nrrd_with_garbage_data(tmp_path):
    path = _write(tmp_path / "x.nrrd", _nrrd_text(encoding="gzip"), b"not gzip at all" * 4)
    with pytest.raises(FewLabelError, match=r"Could not read x\.nrrd"):
        load_volume(path)


# ------------------------------------------------------------------- DICOM
def test_dicom_series_with_a_colour_slice(tmp_path):
    import pydicom

    hu = np.zeros((4, 8, 8), np.int16)
    series = write_ct_series(
        tmp_path / "s", hu, first_position=np.zeros(3), pixel_spacing=(1.0, 1.0),
        slice_step_mm=2.0,
    )  # fmt: skip
    odd = sorted(series.folder.iterdir())[0]  # any slice: first, middle or last in position
    ds = pydicom.dcmread(odd)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
    ds.save_as(odd)
    for read in (load_volume, read_scan_header):
        with pytest.raises(FewLabelError, match=f"{odd.name} in .* has 3 values per pixel"):
            read(series.folder)


def test_dicom_tags_in_latin_1_are_printable(tmp_path, capsys):
    """ISO_IR 100 text is not UTF-8: `fewlabel info` printed surrogates and crashed."""
    import pydicom

    series = write_ct_series(
        tmp_path / "s", np.zeros((3, 8, 8), np.int16), first_position=np.zeros(3),
        pixel_spacing=(1.0, 1.0), slice_step_mm=2.0,
    )  # fmt: skip
    for path in series.folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds["SeriesDescription"].value = "Thorax ñ".encode("latin-1")
        ds.save_as(path)
    assert load_volume(series.folder).header["SeriesDescription"] == "Thorax ñ"
    assert main(["info", str(series.folder)]) == 0
    assert "Thorax ñ" in capsys.readouterr().out


def test_nifti_declaring_gigabytes_of_header_extensions(tmp_path):
    """nib.load reads extensions whole: a forged vox_offset must not make it read 2 GB."""
    data = bytearray(_nifti_bytes((4, 5, 6), np.int16, VOXELS_456))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(data)))
    header["vox_offset"] = 2e9
    data[:348] = header.binaryblock
    data[348:352] = b"\x01\x00\x00\x00"  # "extensions follow"
    data += np.array([2_000_000_000, 6], "<i4").tobytes()  # one 2 GB comment extension
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(FewLabelError, match="2000 MB of header extensions"):
        load_volume(path)


def test_data_file_name_with_a_null_byte(tmp_path):
    # Found by benchmarks/fuzz.py: os.path.realpath raised ValueError("embedded null byte").
    path = tmp_path / "x.mhd"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
        b"ElementDataFile = x\x00.raw\n"
    )
    with pytest.raises(FewLabelError, match="null byte"):
        load_volume(path)
