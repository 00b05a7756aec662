"""DICOM series from a folder, with geometry computed from the slices themselves.

* Files are grouped by SeriesInstanceUID (and orientation, so a localizer
  stored in the same series does not join the stack); the largest group wins
  and the others are listed in ``Volume.header["other_series"]``.
  :func:`list_dicom_series` lists every series of a study folder, and the
  readers take a ``series_uid`` to read one of them instead of the largest.
* Slices are sorted by their position along the slice normal
  (``dot(ImagePositionPatient, row_cosines x column_cosines)``), never by file
  name or InstanceNumber, and must be evenly spaced: a gap means missing files.
* Pixel data is decoded by SimpleITK (GDCM), which handles the compressed
  transfer syntaxes (RLE, JPEG, JPEG-LS, JPEG 2000) and applies
  RescaleSlope/Intercept, so CT comes out in HU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.dicom_guard import length_problem
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.itk import file_array
from napari_fewlabel.io.limits import check_volume_size
from napari_fewlabel.io.volume import RAS_FROM_LPS, Volume, guess_modality, parse_modality

# A study folder can hold thousands of files; read headers of at most this many.
MAX_FILES = 20_000
# Relative tolerance on the spacing between consecutive slices.
_SPACING_TOLERANCE = 0.02

_TAGS = {
    "series_uid": "0020|000e",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "pixel_spacing": "0028|0030",
    "modality": "0008|0060",
    "series_description": "0008|103e",
    "series_number": "0020|0011",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "samples_per_pixel": "0028|0002",
    "bits_allocated": "0028|0100",
    "pixel_representation": "0028|0103",
}
# Technical tags kept in Volume.header (no patient-identifying tags).
_HEADER_TAGS = {
    "Modality": "0008|0060",
    "SeriesDescription": "0008|103e",
    "SeriesNumber": "0020|0011",
    "SeriesInstanceUID": "0020|000e",
    "Manufacturer": "0008|0070",
    "SliceThickness": "0018|0050",
    "ConvolutionKernel": "0018|1210",
    "MagneticFieldStrength": "0018|0087",
}


@dataclass(frozen=True)
class _Slice:
    path: str
    series_uid: str
    position: np.ndarray  # (3,) LPS mm
    row_cosines: np.ndarray  # (3,) direction of increasing column index
    col_cosines: np.ndarray  # (3,) direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    rows: int
    columns: int
    tags: dict[str, str]
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    pixel_signed: bool = False

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.col_cosines)

    def group_key(self) -> tuple[Any, ...]:
        return (
            self.series_uid,
            tuple(np.round(self.row_cosines, 3)),
            tuple(np.round(self.col_cosines, 3)),
            self.rows,
            self.columns,
        )


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff: the 'DICM' magic after the 128-byte preamble, or a .dcm name."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def folder_has_dicom(folder: Path, limit: int = 200) -> bool:
    """Whether any of the first ``limit`` files under ``folder`` looks like DICOM."""
    for n, path in enumerate(_walk_files(folder)):
        if n >= limit:
            return False
        if looks_like_dicom(path):
            return True
    return False


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series of a study folder, as :func:`list_dicom_series` finds it (no pixels read).

    Attributes
    ----------
    uid : str
        SeriesInstanceUID ("" when the files have none); pass it as ``series_uid``.
    number : str
        SeriesNumber, "" when absent.
    description : str
        SeriesDescription, "" when absent.
    modality : str
        Modality tag, "" when absent.
    images : int
        Images in its largest stack (one orientation and image size): what the
        readers would stack. A localizer has 1 to 3.
    """

    uid: str
    number: str
    description: str
    modality: str
    images: int

    @property
    def label(self) -> str:
        """``"#3 T1 axial"``, ``"#3"``, ``"T1 axial"`` or the UID."""
        text = " ".join(
            p for p in (f"#{self.number}" if self.number else "", self.description) if p
        )
        return text or self.uid or "unnamed"


def list_dicom_series(folder: Path) -> list[DicomSeriesInfo]:
    """Every DICOM series under ``folder`` (searched recursively), by series number.

    Only headers are read, under the same limits as the readers (at most
    :data:`MAX_FILES` files, damaged elements skipped). Read one of them with
    ``read_dicom_series(folder, series_uid=info.uid)``.

    Raises
    ------
    FewLabelError
        No DICOM image with a geometry under ``folder``, or too many files.
    """
    by_uid: dict[str, dict[tuple[Any, ...], list[_Slice]]] = {}
    for s in _slices_under(folder):
        by_uid.setdefault(s.series_uid, {}).setdefault(s.group_key(), []).append(s)
    found = []
    for uid, groups in by_uid.items():
        largest = max(groups.values(), key=len)
        tags = largest[0].tags
        found.append(
            DicomSeriesInfo(
                uid=uid,
                number=tags.get("SeriesNumber", ""),
                description=tags.get("SeriesDescription", ""),
                modality=tags.get("Modality", ""),
                images=len(largest),
            )
        )

    def order(info: DicomSeriesInfo) -> tuple[int, float, str, str]:
        try:
            return (0, float(info.number), info.description, info.uid)
        except ValueError:
            return (1, 0.0, info.description, info.uid)

    return sorted(found, key=order)


def read_dicom_header(folder: Path, series_uid: str | None = None) -> ScanHeader:
    """The geometry of the largest DICOM series under ``folder`` (or of ``series_uid``);
    no pixel data is decoded."""
    series = _find_series(folder, series_uid)
    first = series.slices[0]
    return ScanHeader(
        path=str(folder),
        format="DICOM",
        file_shape=(first.columns, first.rows, len(series.slices)),
        dtype=series.stored_dtype,
        affine=RAS_FROM_LPS @ series.lps_affine,
        read_bytes=series.read_bytes,
        modality=parse_modality(first.tags.get("Modality")),
        details=series.header(folder),
    )


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Volume:
    """Read the largest DICOM series under ``folder`` (searched recursively), or the
    series ``series_uid`` (from :func:`list_dicom_series`); its other series are then
    listed in ``header["other_series"]`` as usual."""
    series = _find_series(folder, series_uid)
    chosen, first = series.slices, series.slices[0]
    image = _read_pixels([s.path for s in chosen], folder)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise FewLabelError(
            f"The DICOM images in {folder} decoded to {image.GetNumberOfComponentsPerPixel()} "
            "values per pixel: the series mixes colour and greyscale images; export the "
            "greyscale series on its own."
        )
    data = file_array(image)  # (columns, rows, slices)
    if data.dtype == np.int32 and data.size and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)  # GDCM widens rescaled CT to int32; halve the memory
    if data.shape != (first.columns, first.rows, len(chosen)):
        raise FewLabelError(
            f"The DICOM images in {folder} decoded to shape {data.shape}, expected "
            f"{(first.columns, first.rows, len(chosen))}: the series may mix image sizes."
        )
    modality = parse_modality(first.tags.get("Modality")) or guess_modality(data)
    return Volume.from_file_array(
        data, RAS_FROM_LPS @ series.lps_affine, modality=modality, header=series.header(folder)
    )


@dataclass(frozen=True)
class _Series:
    """The chosen series, sorted by position, with its geometry; pixels not read yet."""

    slices: list[_Slice]
    others: list[str]
    lps_affine: np.ndarray  # (column, row, slice, 1) -> LPS+ mm
    stored_dtype: str
    read_bytes: int

    def header(self, folder: Path) -> dict[str, Any]:
        tags = self.slices[0].tags
        header: dict[str, Any] = {"format": "DICOM", "path": str(folder), "files": len(self.slices)}
        header.update({k: tags[k] for k in _HEADER_TAGS if tags.get(k)})
        if self.others:
            header["other_series"] = self.others
        return header


def _slices_under(folder: Path) -> list[_Slice]:
    """The image headers under ``folder`` that carry a geometry; refuses a folder without."""
    slices = [s for s in (_read_slice_header(p) for p in _walk_files(folder)) if s is not None]
    if not slices:
        raise FewLabelError(
            f"No DICOM images with position and orientation found in {folder}: choose the "
            "folder that holds the series' image files (not a DICOMDIR or report folder)."
        )
    return slices


def _find_series(folder: Path, series_uid: str | None = None) -> _Series:
    """Group the headers under ``folder``, keep the largest series (or the largest stack of
    ``series_uid``), check it can be stacked."""
    slices = _slices_under(folder)
    groups: dict[tuple[Any, ...], list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.group_key(), []).append(s)
    ranked = sorted(groups.values(), key=len, reverse=True)
    if series_uid is not None:
        # The asked-for series first (its largest stack), the others after it as usual.
        ranked.sort(key=lambda g: g[0].series_uid != series_uid)
        if ranked[0][0].series_uid != series_uid:
            raise FewLabelError(
                f"No DICOM series {series_uid} in {folder}: its files were moved or deleted; "
                "list the folder's series again."
            )
    chosen = ranked[0]
    others = _describe_others(ranked[1:])
    _check_same_pixel_format(chosen, folder)

    normal = chosen[0].normal
    chosen.sort(key=lambda s: float(np.dot(s.position, normal)))
    positions = np.array([float(np.dot(s.position, normal)) for s in chosen])
    step = _uniform_step(positions, folder)

    first = chosen[0]
    # GDCM decodes to a 32-bit image (rescaled CT), copied to numpy, then narrowed to int16.
    read_bytes = check_volume_size(
        (first.columns, first.rows, len(chosen)), 4 + 4 + 2, folder.name or str(folder)
    )
    row_mm, col_mm = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = first.row_cosines * col_mm  # i: along a row (increasing column)
    lps[:3, 1] = first.col_cosines * row_mm  # j: down a column (increasing row)
    lps[:3, 2] = normal * step  # k: sorted slices
    lps[:3, 3] = first.position
    stored = "int16" if first.pixel_signed else "uint16"
    if first.bits_allocated <= 8:
        stored = "int8" if first.pixel_signed else "uint8"
    elif first.bits_allocated > 16:
        stored = "int32" if first.pixel_signed else "uint32"
    return _Series(chosen, others, lps, stored, read_bytes)


def _check_same_pixel_format(slices: list[_Slice], folder: Path) -> None:
    """Refuse a series whose images differ in colour or bit depth: GDCM would mis-stack them."""
    for attribute, what in (("samples_per_pixel", "values per pixel"),
                            ("bits_allocated", "bits per pixel")):  # fmt: skip
        values = [getattr(s, attribute) for s in slices]
        usual = max(set(values), key=values.count)
        odd = [s for s in slices if getattr(s, attribute) != usual]
        if odd:
            example = odd[0]
            others = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise FewLabelError(
                f"{Path(example.path).name}{others} in {folder} has "
                f"{getattr(example, attribute)} {what} where the other images of its series "
                f"have {usual} (a colour screenshot or secondary capture?): move it out of the "
                "folder, or export the series again."
            )
    if slices[0].samples_per_pixel != 1:
        raise FewLabelError(
            f"The series in {folder} holds colour images ({slices[0].samples_per_pixel} values "
            "per pixel), not a greyscale CT or MR scan: choose the folder of a CT or MR series."
        )


def _walk_files(folder: Path):  # -> Iterator[Path]
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.upper() == "DICOMDIR" or name.startswith("."):
                continue
            count += 1
            if count > MAX_FILES:
                raise FewLabelError(
                    f"{folder} holds more than {MAX_FILES} files: choose the folder of one "
                    "series rather than a whole archive."
                )
            yield Path(root) / name


def _read_slice_header(path: Path) -> _Slice | None:
    if length_problem(path) is not None:
        # An element longer than the file: GDCM would allocate the declared length (up to
        # 4 GB) before failing. Damaged, so skipped like an unreadable file (a gap).
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # not DICOM (or not an image): skip it, like any viewer would

    def tag(key: str) -> str:
        t = _TAGS[key]
        return _text(reader.GetMetaData(t)) if reader.HasMetaDataKey(t) else ""

    try:
        position = _floats(tag("position"), 3)
        orientation = _floats(tag("orientation"), 6)
        spacing = _floats(tag("pixel_spacing"), 2)
        rows, columns = int(tag("rows")), int(tag("columns"))
    except ValueError:
        return None  # no usable geometry (a report, a secondary capture)
    if rows <= 0 or columns <= 0:
        return None
    row_cos, col_cos = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row_cos) - 1) > 0.01 or abs(np.linalg.norm(col_cos) - 1) > 0.01:
        return None
    tags = {}
    for name, key in _HEADER_TAGS.items():
        if reader.HasMetaDataKey(key):
            tags[name] = _text(reader.GetMetaData(key))
    return _Slice(
        path=str(path),
        series_uid=tag("series_uid"),
        position=position,
        row_cosines=row_cos,
        col_cosines=col_cos,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=rows,
        columns=columns,
        tags=tags,
        samples_per_pixel=_int_tag(tag("samples_per_pixel"), 1),
        bits_allocated=_int_tag(tag("bits_allocated"), 16),
        pixel_signed=_int_tag(tag("pixel_representation"), 0) == 1,
    )


def _text(value: str) -> str:
    """A tag's text; SimpleITK hands non-UTF-8 bytes over as surrogates, which cannot be
    printed. They are most often ISO_IR 100 (Latin-1), so decode them as that."""
    raw = value.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip(" \x00")


def _int_tag(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _floats(text: str, n: int) -> np.ndarray:
    values = np.array([float(v) for v in text.split("\\") if v.strip()], dtype=np.float64)
    if values.size != n or not np.all(np.isfinite(values)):
        raise ValueError(text)
    return values


def _uniform_step(positions: np.ndarray, folder: Path) -> float:
    if positions.size < 2:
        raise FewLabelError(
            f"The series in {folder} has a single slice: a 3D series of at least two "
            "slices is needed."
        )
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        raise FewLabelError(
            f"Several images of the series in {folder} share one slice position (several "
            "echoes, phases or time points?): export one 3D volume per folder."
        )
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > _SPACING_TOLERANCE * median)
    if bad.size:
        i = int(bad[0])
        raise FewLabelError(
            f"The slices in {folder} are not evenly spaced: {steps[i]:.2f} mm between "
            f"slices {i} and {i + 1} where the others are {median:.2f} mm apart. Slices are "
            "missing: export the complete series."
        )
    return float(steps.mean())


def _read_pixels(files: list[str], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except MemoryError:
        raise
    except Exception as exc:  # GDCM raises RuntimeError for anything it cannot decode
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise FewLabelError(
            f"Could not decode the DICOM pixel data in {folder} ({lines[-1][:200]}): the "
            "files may be truncated or use an unsupported compression; export the series "
            "uncompressed."
        ) from exc


def _describe_others(groups: list[list[_Slice]]) -> list[str]:
    """One line per other series ("#4 Scout (3 images)"), localizer planes merged."""
    counts: dict[str, int] = {}
    for group in groups:
        tags = group[0].tags
        label = tags.get("SeriesDescription") or tags.get("SeriesInstanceUID") or "unnamed"
        number = tags.get("SeriesNumber")
        name = f"#{number} {label}" if number else label
        counts[name] = counts.get(name, 0) + len(group)
    return [f"{name} ({n} image{'s' if n > 1 else ''})" for name, n in counts.items()]
