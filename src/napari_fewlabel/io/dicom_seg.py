"""DICOM SEG export for scans read from a DICOM series (highdicom).

A label map drawn on a :class:`~napari_fewlabel.io.Volume` that came from a
DICOM series folder (:func:`~napari_fewlabel.io.dicom.read_dicom_series`) is
written as one DICOM Segmentation instance (BINARY) that references the source
series: every frame points at the SOP instance of the CT/MR slice it lies on,
and the SEG shares the source's study, patient and frame of reference, so PACS
viewers and 3D Slicer put it on top of the scan.

* The source slices are found again the way the reader found them (same
  grouping by series, same sort along the slice normal), and the label map is
  put back on them through the Volume's own display -> file-grid mapping
  (:meth:`Volume.to_file_grid`). For a DICOM source the file grid is
  ``(column, row, slice)``, so ``file[:, :, k].T`` is the ``(rows, columns)``
  frame of the k-th slice along the normal. No geometry is derived twice: the
  series re-read must give the same shape and voxel-to-world affine as the
  Volume, or the export is refused (the files changed).
* One segment per non-background class, **segment number = class index**,
  whether or not the class occurs in the mask: a class absent from the mask is
  an empty segment, so segment numbers mean the same in every SEG made with
  one model card. Frames without any voxel of a segment are omitted (unless
  the whole mask is background: a SEG needs a frame). Segment labels are the
  class names; the recommended display colours are the class colours.
* Classes here are named by the user, not coded, so every segment gets the
  generic SNOMED CT code "Tissue" (85756007) as its segmented property
  category and type; the name is in SegmentLabel.
* Only the files' headers are read (no pixel data). Type 2 patient and study
  attributes that an anonymiser dropped are written empty, as DICOM allows; a
  source without a study, SOP instance or frame-of-reference UID is refused.
* highdicom and pydicom are imported on first use (highdicom takes about half
  a second to import), so importing this module costs nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from napari_fewlabel import __version__
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.save import checked_labels
from napari_fewlabel.io.volume import RAS_FROM_LPS, FileGrid, Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Suffix of the SEG files written by :func:`write_dicom_seg`.
SEG_SUFFIX = ".dcm"
#: How far (mm) the re-read series' geometry may differ from the Volume's.
_GEOMETRY_TOLERANCE_MM = 1e-3
#: Type 2 patient and study attributes (present, possibly empty) that a SEG copies from its
#: source. Anonymised series often drop them; they are added empty to the headers in memory.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
#: Type 1 attributes a SEG cannot be made without.
_REQUIRED = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "FrameOfReferenceUID")

AlgorithmType = Literal["MANUAL", "SEMIAUTOMATIC", "AUTOMATIC"]


class NamedClass(Protocol):
    """A class with a label value and a name (e.g. a ``SegmentationClass``)."""

    @property
    def index(self) -> int: ...

    @property
    def name(self) -> str: ...


#: A class as an object with ``.index``/``.name`` (and optionally ``.color``) or as a
#: mapping ``{"index", "name", "color"}`` (``MaskInfo.classes``).
ClassLike = NamedClass | Mapping[str, Any]


@dataclass(frozen=True)
class _Source:
    """The source series, slices sorted along the normal as the reader sorts them."""

    folder: Path
    datasets: list[Dataset]  # headers only, one per slice, index = file-grid k

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def write_dicom_seg(
    labels: np.ndarray,
    like: Volume,
    path: str | Path,
    classes: Sequence[ClassLike],
    *,
    source_folder: str | Path | None = None,
    algorithm_type: AlgorithmType = "SEMIAUTOMATIC",
    series_number: int = 901,
    series_description: str = "napari-fewlabel segmentation",
) -> Path:
    """Write a label map ``(z, y, x)`` drawn on ``like`` as a DICOM SEG of its source series.

    Parameters
    ----------
    labels : ndarray, shape (z, y, x)
        Label map in display orientation (the orientation of ``like.array``);
        0 = background, ``c`` = the class with index ``c``.
    like : Volume
        The scan, as read from a DICOM series folder.
    path : path-like
        The SEG file to write (conventionally ``.dcm``); it appears complete or
        not at all.
    classes : sequence of class-like
        The model card's classes (objects with ``.index``/``.name`` such as
        ``SegmentationClass``, or ``{"index", "name", "color"}`` mappings).
        Background (index 0) is skipped; the others must be numbered
        ``1, 2, ..., n`` and each becomes the segment of that number, present in
        the mask or not.
    source_folder : path-like, optional
        Where the source series' files are now; default: the folder the scan was
        read from (``like.header["path"]``).
    algorithm_type : {"SEMIAUTOMATIC", "MANUAL", "AUTOMATIC"}
        SegmentAlgorithmType of every segment: SEMIAUTOMATIC (default) for a
        model fine-tuned on a few painted slices, MANUAL for painted labels only.
    series_number, series_description :
        Of the new SEG series.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FewLabelError
        ``like`` was not read from DICOM, its files are missing or changed, the
        labels do not fit the scan or the classes, or ``path`` cannot be written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path).expanduser()
    if path.is_dir():
        raise FewLabelError(f"{path} is a folder: give a file name ending in {SEG_SUFFIX}.")
    source = _source_series(like, source_folder)
    labels = checked_labels(labels, like)
    numbered = _segment_classes(classes)
    top = int(labels.max(initial=0))
    if top > len(numbered):
        raise FewLabelError(
            f"The labels contain the value {top} but only {len(numbered)} classes besides "
            "background are named: give a class for every label value (or erase that label)."
        )
    # Display (z, y, x) -> file grid (column, row, slice) -> frames (slice, row, column).
    frames = np.ascontiguousarray(like.to_file_grid(labels).transpose(2, 1, 0))

    if algorithm_type == "MANUAL":
        algorithm = None
    else:
        algorithm = hd.AlgorithmIdentificationSequence(
            name="napari-fewlabel",
            family=codes.DCM.ArtificialIntelligence,
            version=__version__,
        )
    descriptions = []
    for number, (name, color) in enumerate(numbered, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_segment_label(name, number),
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=algorithm_type,
                algorithm_identification=algorithm,
                display_color=None if color is None else hd.color.CIELabColor.from_rgb(*color),
            )
        )
    try:
        seg = hd.seg.Segmentation(
            source_images=source.datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="napari-fewlabel",
            manufacturer_model_name="napari-fewlabel",
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description[:64],
            content_label="FEWLABEL",
            content_description="Segmentation from napari-fewlabel",
            # An all-background mask keeps its empty frames (a SEG needs at least one).
            omit_empty_frames=bool(frames.any()),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise FewLabelError(
            f"The DICOM files in {source.folder} lack what a DICOM SEG must copy from them "
            f"({str(exc).strip()[:200]}): export the mask as NIfTI instead."
        ) from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


def read_dicom_seg(
    path: str | Path, like: Volume | ScanHeader, *, source_folder: str | Path | None = None
) -> np.ndarray:
    """Read a DICOM SEG of ``like``'s source series as a label map in display orientation.

    The inverse of :func:`write_dicom_seg`: voxel value = segment number
    (0 where no segment), ``uint8`` or wider as needed, shape ``like.shape``.
    Segments must not overlap. The SEG must reference the series ``like`` was
    read from; its frames are matched to the source slices by SOP Instance UID.
    ``like`` may be the scan's header alone (:func:`~napari_fewlabel.io.dicom.read_dicom_header`):
    no pixel data of the scan is needed.
    """
    path = Path(path).expanduser()
    source = _source_series(like, source_folder)
    seg = _segread(path)
    series_uid = str(source.datasets[0].SeriesInstanceUID)
    referenced = {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence}
    if series_uid not in referenced:
        raise FewLabelError(
            f"{path.name} segments another series than the scan ({series_uid}): open the "
            "scan the segmentation was made on."
        )
    numbers = seg.segment_numbers
    dtype = np.uint8 if max(numbers, default=0) <= 255 else np.uint16
    try:
        frames = seg.get_pixels_by_source_instance(
            source.sop_instance_uids,
            combine_segments=True,
            relabel=False,
            assert_missing_frames_are_empty=True,
            dtype=dtype,
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise FewLabelError(
            f"{path.name} does not fit the slices of the scan ({str(exc).strip()[:200]}): open "
            "the scan the segmentation was made on."
        ) from exc
    # frames (slice, row, column) -> file grid (column, row, slice) -> display (z, y, x).
    file_labels = np.asarray(frames).transpose(2, 1, 0)
    return _to_display(file_labels, _geometry(like)[1])


def read_segment_labels(path: str | Path) -> tuple[str, ...]:
    """The SegmentLabel of each segment of a DICOM SEG, in segment-number order (read from
    the header alone: the frames are not decoded)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path).expanduser()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        items = header.SegmentSequence if header.get("Modality") == "SEG" else None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            InvalidDicomError) as exc:  # fmt: skip
        items, reason = None, str(exc).strip()[:200]
    else:
        reason = "not a Modality SEG file"
    if items is None:
        raise FewLabelError(
            f"Cannot read {path} as a DICOM SEG ({reason}): choose a segmentation file "
            "(Modality SEG)."
        )
    by_number = {int(item.SegmentNumber): str(item.SegmentLabel) for item in items}
    return tuple(by_number[n] for n in sorted(by_number))


def segment_labels(classes: Sequence[ClassLike]) -> tuple[str, ...]:
    """The SegmentLabel that :func:`write_dicom_seg` gives each class besides background."""
    return tuple(
        _segment_label(name, number)
        for number, (name, _) in enumerate(_segment_classes(classes), start=1)
    )


def _segread(path: Path) -> Any:
    import highdicom as hd
    from pydicom.errors import InvalidDicomError

    try:
        return hd.seg.segread(path)
    except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            InvalidDicomError) as exc:  # fmt: skip
        raise FewLabelError(
            f"Cannot read {path} as a DICOM SEG ({str(exc).strip()[:200]}): choose a "
            "segmentation file (Modality SEG)."
        ) from exc


# ------------------------------------------------------------------ helpers
def _geometry(like: Volume | ScanHeader) -> tuple[Mapping[str, Any], FileGrid]:
    """The source header and file grid of a scan or of its header."""
    if isinstance(like, ScanHeader):
        return like.details, like.file_grid()
    return like.header, like.grid


def _source_series(like: Volume | ScanHeader, source_folder: str | Path | None) -> _Source:
    """Find the scan's source slices again, check they are unchanged, read their headers."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from napari_fewlabel.io.dicom import _find_series

    header, grid = _geometry(like)
    if header.get("format") != "DICOM":
        raise FewLabelError(
            "DICOM SEG needs a scan read from a DICOM series; export NIfTI instead (this scan "
            f"was read from {header.get('format') or 'an array'})."
        )
    where = source_folder if source_folder is not None else header.get("path")
    if not where:
        raise FewLabelError(
            "The scan does not say which folder its DICOM series was read from: give the "
            "series folder (source_folder), or export NIfTI instead."
        )
    folder = Path(where).expanduser()
    if not folder.is_dir():
        raise FewLabelError(
            f"The DICOM series folder {folder} is missing: a DICOM SEG must reference the "
            "source files; give the folder where they are now, or export NIfTI instead."
        )
    uid = header.get("SeriesInstanceUID")
    try:
        # The reader picks that series even when it is not the folder's largest (where
        # the reader can choose a series; typed loosely so either reader type-checks).
        find: Callable[..., Any] = _find_series
        if uid and "series_uid" in inspect.signature(find).parameters:
            series = find(folder, series_uid=uid)
        else:
            series = _find_series(folder)
    except FewLabelError as exc:
        raise FewLabelError(
            f"The source series cannot be read again for the DICOM SEG: {exc}"
        ) from exc
    found = series.slices[0].series_uid
    if uid and found != uid:
        raise FewLabelError(
            f"{folder} now holds series {found}, not the series {uid} the scan was read "
            "from: give the folder of the scan's own series, or export NIfTI instead."
        )
    first = series.slices[0]
    shape = (first.columns, first.rows, len(series.slices))
    affine = RAS_FROM_LPS @ series.lps_affine
    if shape != tuple(grid.shape) or not np.allclose(
        affine, grid.affine, atol=_GEOMETRY_TOLERANCE_MM
    ):
        raise FewLabelError(
            f"The DICOM files in {folder} changed since the scan was opened (now "
            f"{shape[2]} slices of {shape[1]} x {shape[0]}, scan {grid.shape[2]} of "
            f"{grid.shape[1]} x {grid.shape[0]}, or moved slices): open the scan "
            "again and redo the export."
        )
    datasets: list[Dataset] = []
    for s in series.slices:
        try:
            ds = pydicom.dcmread(s.path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            raise FewLabelError(
                f"Cannot read {s.path} again ({exc}): the source files changed since the "
                "scan was opened; open the scan again and redo the export."
            ) from exc
        if str(ds.get("SeriesInstanceUID", "")) != s.series_uid:
            raise FewLabelError(
                f"{s.path} belongs to another series than when the scan was opened: open the "
                "scan again and redo the export."
            )
        missing = [name for name in _REQUIRED if not ds.get(name)]
        if missing:
            raise FewLabelError(
                f"{s.path} has no {', '.join(missing)}, which a DICOM SEG must reference: "
                "export the mask as NIfTI instead."
            )
        for name in _TYPE2_COPIED:
            if name not in ds:
                setattr(ds, name, "")
        datasets.append(ds)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        raise FewLabelError(
            f"Several files in {folder} share one SOP Instance UID (copies of one slice): a "
            "DICOM SEG cannot tell them apart; remove the copies or export NIfTI instead."
        )
    return _Source(folder=folder, datasets=datasets)


def _segment_classes(
    classes: Sequence[ClassLike],
) -> list[tuple[str, tuple[int, int, int] | None]]:
    """(name, colour) of classes 1..n in order; refuses gaps and duplicates."""
    entries: dict[int, tuple[str, tuple[int, int, int] | None]] = {}
    for c in classes:
        if isinstance(c, Mapping):
            index, name, color = c.get("index"), c.get("name"), c.get("color")
        else:
            index, name, color = c.index, c.name, getattr(c, "color", None)
        try:
            index = int(index)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise FewLabelError(
                f"A class has no whole-number index ({index!r}): number the classes 0, 1, 2, ..."
            ) from exc
        if index in entries:
            raise FewLabelError(f"Two classes have index {index}: give each class its own number.")
        rgb = None
        if color is not None:
            r, g, b = (int(v) for v in color)
            rgb = (r, g, b)
        entries[index] = (str(name), rgb)
    numbered = sorted(i for i in entries if i != 0)
    if not numbered:
        raise FewLabelError(
            "A DICOM SEG needs at least one class besides background: name the structures "
            "(classes 1, 2, ...)."
        )
    if numbered != list(range(1, len(numbered) + 1)):
        raise FewLabelError(
            f"Class indices must be 1, 2, 3, ... besides background, got {numbered}: renumber "
            "the classes."
        )
    return [entries[i] for i in numbered]


def _segment_label(name: str, number: int) -> str:
    """SegmentLabel is a DICOM LO: at most 64 characters, no backslash or control characters."""
    clean = "".join(ch for ch in name.replace("\\", "/") if ch.isprintable()).strip()
    return (clean or f"class {number}")[:64]


def _to_display(file_labels: np.ndarray, grid: FileGrid) -> np.ndarray:
    """File grid ``(i, j, k)`` -> display ``(z, y, x)``: the inverse of ``Volume.to_file_grid``."""
    from nibabel import orientations as nio

    return np.ascontiguousarray(nio.apply_orientation(file_labels, grid.to_display))
