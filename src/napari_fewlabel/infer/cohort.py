"""Segment a cohort: many scans, one model, one mask per scan, a summary table.

>>> scans = find_scans(["ct1.nii.gz", "study_folder", "more_scans.txt"])  # doctest: +SKIP
>>> summary = predict_cohort(load_checkpoint(path), scans, Path("masks"))  # doctest: +SKIP
>>> summary.failed                                                         # doctest: +SKIP

* :func:`find_scans` turns what the user gave (scan files, DICOM folders, a
  study folder holding several series, ``.txt`` lists of paths) into
  :class:`Scan` s, one per volume, each with a unique, filesystem-safe mask
  name. A path that is missing or a folder without a readable series becomes a
  scan that fails with that reason, so one bad entry never stops a cohort.
* :func:`predict_cohort` predicts each scan with one loaded model and writes
  its mask on the scan's grid (:data:`NIFTI`, or another :class:`MaskFormat`);
  a scan whose complete mask is already there is skipped, so an interrupted
  run resumes where it stopped. It writes ``summary.csv`` and
  ``summary.json`` (per scan: status, shape, spacing, voxels and mL per
  class, seconds) atomically.
* Under ``torchrun --nproc_per_node=N`` (:func:`torchrun_ranks`), rank ``r``
  predicts ``scans[r::N]``, writes those masks only, and the ranks' results
  are gathered so that rank 0 writes the merged summary.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import MaskInfo, load_volume, read_mask_info, read_scan_header, save_labels
from napari_fewlabel.io.atomic import atomic_path, remove_stale_temp_files
from napari_fewlabel.io.dicom import (
    folder_has_dicom,
    list_dicom_series,
    read_dicom_header,
    read_dicom_series,
)
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.invesalius import INVESALIUS_SUFFIX
from napari_fewlabel.io.itk import ITK_SUFFIXES
from napari_fewlabel.io.nifti import NIFTI_SUFFIXES
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import SegmentationModel
from napari_fewlabel.train.pretrain_base import Ranks, device_for

logger = logging.getLogger(__name__)

#: A ``.txt`` input is a list of scan paths, one a line.
LIST_SUFFIX = ".txt"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
#: A study-folder series with fewer images than this is a localizer, not a volume.
MIN_SERIES_IMAGES = 2
#: How long a rank that finished its share waits for the others at the final gather
#: (gloo and NCCL give up after 30 minutes by default; shares can differ by hours).
GATHER_TIMEOUT = datetime.timedelta(days=7)
_FILE_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, INVESALIUS_SUFFIX)
_SCAN_SUFFIXES = (*_FILE_SUFFIXES, ".dcm")
_MAX_NAME = 120

Status = Literal["done", "skipped", "failed"]


# --------------------------------------------------------------------- scans
@dataclass(frozen=True)
class Scan:
    """One volume to segment.

    Attributes
    ----------
    path : Path
        A scan file or a DICOM folder.
    series_uid : str or None
        For a DICOM folder: the series to read (None: the largest).
    series : str
        The series' label (``"#3 T1 axial"``) when a folder holds several.
    name : str
        Mask file name without the format's suffix: unique in the cohort.
    problem : str or None
        Known to fail before reading (a missing path): the reason.
    skip : str or None
        Not a volume to segment (a localizer series): the reason.
    """

    path: Path
    series_uid: str | None = None
    series: str = ""
    name: str = ""
    problem: str | None = None
    skip: str | None = None

    def __str__(self) -> str:
        return f"{self.path} [{self.series}]" if self.series else str(self.path)

    def header(self) -> ScanHeader:
        """The scan's header (no voxels read)."""
        if self.series_uid is not None:
            return read_dicom_header(self.path, self.series_uid)
        return read_scan_header(self.path)

    def load(self) -> Volume:
        if self.series_uid is not None:
            return read_dicom_series(self.path, self.series_uid)
        return load_volume(self.path)


def find_scans(inputs: Iterable[str | os.PathLike[str]]) -> list[Scan]:
    """The scans that ``inputs`` name, in order, each once, with unique mask names.

    Parameters
    ----------
    inputs : iterable of path-like
        Scan files (NIfTI, NRRD, MetaImage, InVesalius), DICOM folders (a
        folder holding several series gives one scan per series; series of a
        single image, localizers, are listed as skipped), ``.dcm`` files (their
        folder), folders of scan files without DICOM (each file in it, not in
        its subfolders), or ``.txt`` files listing such paths one a line (blank
        lines and lines starting with ``#`` are ignored; relative paths are
        relative to the list file).

    Raises
    ------
    FewLabelError
        A list file that cannot be read, or nothing to segment at all. A
        missing scan path is not an error here: it becomes a scan that fails.
    """
    found: list[Scan] = []
    for item in inputs:
        found.extend(_expand(Path(item).expanduser(), Path.cwd(), ()))
    if not found:
        raise FewLabelError(
            "The inputs name no scan (empty list files?): give scan files, DICOM folders or "
            "a .txt file listing them."
        )
    unique: list[Scan] = []
    seen: set[tuple[str, str | None]] = set()
    for scan in found:
        key = (os.path.normcase(os.path.abspath(scan.path)), scan.series_uid)
        if key not in seen:
            seen.add(key)
            unique.append(scan)
    return _named(unique)


def _expand(path: Path, base: Path, lists: tuple[Path, ...]) -> list[Scan]:
    path = Path(os.path.normpath(base / path))  # "lists/../data/a.nii" -> "data/a.nii"
    if path.name.lower().endswith(LIST_SUFFIX):
        return _read_list(path, lists)
    if not path.exists():
        return [Scan(path, problem=f"No file or folder at {path}: check the path.")]
    if path.is_dir():
        return _series_in(path)
    if path.name.lower().endswith(".dcm"):
        return _series_in(path.parent)  # a slice stands for its series (a glob of *.dcm)
    return [Scan(path)]


def _read_list(path: Path, lists: tuple[Path, ...]) -> list[Scan]:
    real = path.resolve()
    if real in lists:
        raise FewLabelError(f"The list file {path} lists itself (through {lists[-1]}): fix it.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FewLabelError(
            f"Cannot read the list file {path} ({reason}): give a UTF-8 text file with one "
            "scan path a line."
        ) from exc
    scans: list[Scan] = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            scans.extend(_expand(Path(entry).expanduser(), path.parent, (*lists, real)))
    return scans


def _series_in(folder: Path) -> list[Scan]:
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith(_FILE_SUFFIXES) and not p.name.startswith(".")
    )  # fmt: skip
    if files and not folder_has_dicom(folder):
        return [Scan(p) for p in files]  # a folder of scan files: each of them
    try:
        series = list_dicom_series(folder)
    except FewLabelError as exc:
        return [Scan(folder, problem=str(exc))]
    if len(series) == 1:
        return [Scan(folder, series_uid=series[0].uid)]
    scans = []
    for info in series:
        skip = None
        if info.images < MIN_SERIES_IMAGES:
            skip = f"{info.images} image(s), not a 3D series (a localizer?)"
        scans.append(Scan(folder, series_uid=info.uid, series=info.label, skip=skip))
    return scans


def _named(scans: list[Scan]) -> list[Scan]:
    """Give every scan a unique, filesystem-safe mask name (case-insensitively unique)."""
    taken: set[str] = set()
    named = []
    for scan in scans:
        base = _safe(_stem(scan))
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        named.append(replace(scan, name=name))
    return named


def _stem(scan: Scan) -> str:
    path = scan.path
    if scan.series_uid is not None or path.is_dir():
        folder = path.name or path.resolve().name or "dicom"
        return f"{folder}_{scan.series}" if scan.series else folder
    name = path.name
    for suffix in sorted(_SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _safe(text: str) -> str:
    text = text.replace("#", "s")  # "#3 T1" -> "s3_T1"
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return text[:_MAX_NAME] or "scan"


# --------------------------------------------------------------- mask format
@dataclass(frozen=True)
class StoredMask:
    """A mask read back: labels ``(z, y, x)``, their display affine, the class names stored."""

    labels: np.ndarray
    affine: np.ndarray
    class_names: tuple[str, ...] | None


def _names_as_given(classes: Sequence[SegmentationClass]) -> tuple[str, ...]:
    return tuple(c.name for c in classes)


@dataclass(frozen=True)
class MaskFormat:
    """How masks are written and read back (for resuming).

    Attributes
    ----------
    name : str
    suffix : str
        Appended to a scan's name: ``"_mask.nii.gz"``.
    write : callable
        ``write(labels, scan_volume, path, info)``: write ``labels`` ``(z, y, x)`` on
        the scan's geometry so that the file appears at ``path`` complete or not at all.
    read : callable
        ``read(path, scan_header) -> StoredMask``; raises FewLabelError on a damaged
        file or one that does not belong to the scan.
    stored_names : callable
        ``stored_names(classes)``: the class names a complete mask of these classes
        stores (compared with :attr:`StoredMask.class_names` when resuming).
    check_scan : callable, optional
        ``check_scan(scan)`` raises FewLabelError before prediction for a scan this
        format cannot describe (a DICOM SEG needs a DICOM series).
    """

    name: str
    suffix: str
    write: Callable[[np.ndarray, Volume, Path, MaskInfo], object]
    read: Callable[[Path, ScanHeader], StoredMask]
    stored_names: Callable[[Sequence[SegmentationClass]], tuple[str, ...]] = _names_as_given
    check_scan: Callable[[Scan], None] | None = None


def _write_nifti(labels: np.ndarray, like: Volume, path: Path, info: MaskInfo) -> Path:
    return save_labels(labels, like=like, path=path, info=info)


def _read_nifti(path: Path, header: ScanHeader) -> StoredMask:
    info = read_mask_info(path)
    names = tuple(str(c["name"]) for c in info.classes) if info and info.classes else None
    mask = load_volume(path)
    return StoredMask(mask.array, mask.affine, names)


#: NIfTI masks with the class names in a header extension (what ``fewlabel predict`` writes).
NIFTI = MaskFormat("nifti", "_mask.nii.gz", _write_nifti, _read_nifti)


def _write_seg(labels: np.ndarray, like: Volume, path: Path, info: MaskInfo) -> Path:
    from napari_fewlabel.io.dicom_seg import write_dicom_seg

    return write_dicom_seg(labels, like, path, info.classes, algorithm_type="AUTOMATIC")


def _read_seg(path: Path, header: ScanHeader) -> StoredMask:
    from napari_fewlabel.io.dicom_seg import read_dicom_seg, read_segment_labels

    labels = read_dicom_seg(path, header)
    return StoredMask(labels, header.display_geometry()[1], read_segment_labels(path))


def _seg_names(classes: Sequence[SegmentationClass]) -> tuple[str, ...]:
    from napari_fewlabel.io.dicom_seg import segment_labels

    return segment_labels(classes)


def _needs_dicom(scan: Scan) -> None:
    if scan.series_uid is None:
        raise FewLabelError(
            f"{scan.path} is not a DICOM series, and a DICOM SEG can only reference one: "
            "segment it with --format nifti (or give its DICOM folder)."
        )


#: DICOM Segmentation objects referencing each scan's source series (DICOM scans only).
#: Segments are numbered by class index and labelled with the class names; the
#: algorithm type is AUTOMATIC (a cohort is predicted without a person's edits).
DICOM_SEG = MaskFormat("seg", "_seg.dcm", _write_seg, _read_seg, _seg_names, _needs_dicom)

#: The formats by name (``fewlabel predict --format``).
MASK_FORMATS = {f.name: f for f in (NIFTI, DICOM_SEG)}


# ------------------------------------------------------------------ results
@dataclass
class ScanResult:
    """What happened to one scan: one row of the summary.

    Attributes
    ----------
    index : int
        Position in the cohort.
    scan : str
        The scan's path (and series).
    mask : str
        The mask's path ("" when none was written or found).
    status : {"done", "skipped", "failed"}
    reason : str
        Why it was skipped or failed ("" when done).
    rank : int
        The process that handled it (0 when run alone).
    shape : tuple of int or None
        ``(z, y, x)`` voxels.
    spacing_mm : tuple of float or None
        ``(z, y, x)`` voxel size.
    voxels, ml : dict
        Voxels and volume in mL (voxels x voxel volume in mm3 / 1000) per
        foreground class name; for a skipped scan, counted from its mask.
    seconds : float
    """

    index: int
    scan: str
    mask: str = ""
    status: Status = "done"
    reason: str = ""
    rank: int = 0
    shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    voxels: dict[str, int] = field(default_factory=dict)
    ml: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class CohortSummary:
    """The merged results of a cohort, in input order (the same on every rank).

    Attributes
    ----------
    results : list of ScanResult
    out_dir : Path
    csv_path, json_path : Path or None
        The summary files (None on ranks other than 0, which write nothing).
    processes : int
    seconds : float
        Wall time of :func:`predict_cohort`.
    """

    results: list[ScanResult]
    out_dir: Path
    csv_path: Path | None
    json_path: Path | None
    processes: int
    seconds: float

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[ScanResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """Every scan was segmented or skipped (nothing failed)."""
        return not self.failed


# -------------------------------------------------------------------- torchrun
@contextlib.contextmanager
def torchrun_ranks(device: str = "auto") -> Iterator[Ranks]:
    """Join torchrun's process group for the block, when its variables are set.

    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set by ``torchrun`` (or any launcher)
    and ``WORLD_SIZE > 1``: the group is initialised (NCCL with CUDA and
    ``device`` auto or cuda, gloo otherwise) with a long timeout, and left at
    the end. Without ``OMP_NUM_THREADS`` each rank uses ``cpus // world``
    threads. Run alone: rank 0 of 1, nothing initialised.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        yield Ranks(0, 1, 0, False)
        return
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    started = False
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=GATHER_TIMEOUT)
        started = True
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cpu_count() // world))
    try:
        yield Ranks(rank, world, local_rank, started)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def find_scans_once(inputs: Sequence[str | os.PathLike[str]], ranks: Ranks) -> list[Scan]:
    """:func:`find_scans` on rank 0, its answer (or its error) shared with every rank."""
    if ranks.world_size == 1:
        return find_scans(inputs)
    box: list[Any] = [None]
    if ranks.is_main:
        try:
            box[0] = find_scans(inputs)
        except FewLabelError as exc:
            box[0] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise FewLabelError(box[0])
    return list(box[0])


# --------------------------------------------------------------------- predict
def predict_cohort(
    model: SegmentationModel,
    scans: Sequence[Scan],
    out_dir: str | os.PathLike[str],
    *,
    mask_format: MaskFormat = NIFTI,
    device: str = "auto",
    axis: int | None = None,
    batch_size: int | None = None,
    test_time_flips: bool | None = None,
    ranks: Ranks | None = None,
    on_result: Callable[[ScanResult, int, int], None] | None = None,
    details: dict[str, Any] | None = None,
) -> CohortSummary:
    """Segment ``scans`` into ``out_dir``, skipping those whose mask is there already.

    Parameters
    ----------
    model : SegmentationModel
        Loaded once (:func:`~napari_fewlabel.models.checkpoint.load_checkpoint`).
    scans : sequence of Scan
        From :func:`find_scans` (the same list on every rank).
    out_dir : path-like
        Created if missing; receives one mask per scan (``<name><suffix>``)
        and ``summary.csv``/``summary.json``.
    mask_format : MaskFormat
    device, axis, batch_size, test_time_flips
        As for :func:`~napari_fewlabel.infer.predict.predict_volume`; under
        torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.
    ranks : Ranks, optional
        From :func:`torchrun_ranks`: this rank predicts ``scans[rank::world]``.
    on_result : callable, optional
        ``on_result(result, handled, share)`` after each of this rank's scans.
    details : dict, optional
        Added to ``summary.json`` (the model's name, the command).

    Returns
    -------
    CohortSummary
        All scans' results on every rank; rank 0 wrote the summary files.

    Notes
    -----
    A scan that cannot be read or predicted is a ``failed`` row with the
    reason; the run goes on. A mask counts as done when it reads back, has
    the scan's shape and spacing (from the scan's header) and names the
    model's classes; anything else is predicted again.
    """
    started = time.perf_counter()
    if batch_size is not None and batch_size < 1:  # not a fault of every scan
        raise FewLabelError(f"The batch size must be at least 1, got {batch_size}.")
    ranks = ranks or Ranks(0, 1, 0, False)
    out = Path(out_dir).expanduser().absolute()
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
    if ranks.world_size > 1:
        dist.barrier()  # the folder exists before any rank writes into it
    dev = device_for(device, ranks)
    classes = model.card.classes
    names = [c.name for c in classes]
    info = MaskInfo.of_classes(classes)
    stored_names = mask_format.stored_names(classes)  # classes it cannot store: fail now
    mine = list(range(ranks.rank, len(scans), ranks.world_size))
    results = []
    for handled, index in enumerate(mine, start=1):
        scan = scans[index]
        t0 = time.perf_counter()
        result = ScanResult(index=index, scan=str(scan), rank=ranks.rank)
        try:
            _handle(scan, result, out, mask_format, stored_names, info, model, dev,
                    dict(axis=axis, batch_size=batch_size, test_time_flips=test_time_flips))  # fmt: skip
        except FewLabelError as exc:
            result.status, result.reason = "failed", str(exc)
        except Exception as exc:  # a scan that breaks the reader or the network: report, go on
            logger.error("%s failed", scan, exc_info=True)
            result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - t0
        results.append(result)
        if on_result is not None:
            on_result(result, handled, len(mine))

    merged = _gather(results, ranks)
    summary = CohortSummary(
        merged, out, None, None, ranks.world_size, time.perf_counter() - started
    )
    if ranks.is_main:
        summary.csv_path, summary.json_path = write_summary(
            summary, names[1:], {"classes": names, "device": str(dev), **(details or {})}
        )
    if ranks.world_size > 1:
        dist.barrier()  # the summary is written when any rank returns
    return summary


def _handle(
    scan: Scan,
    result: ScanResult,
    out: Path,
    fmt: MaskFormat,
    stored_names: tuple[str, ...],
    info: MaskInfo,
    model: SegmentationModel,
    device: torch.device,
    options: dict[str, Any],
) -> None:
    """Fill ``result`` for one scan (raises FewLabelError for a failed one)."""
    from napari_fewlabel.infer.predict import predict_volume

    if scan.problem is not None:
        raise FewLabelError(scan.problem)
    if scan.skip is not None:
        result.status, result.reason = "skipped", scan.skip
        return
    if fmt.check_scan is not None:
        fmt.check_scan(scan)
    names = [c.name for c in model.card.classes]
    mask_path = out / (scan.name + fmt.suffix)
    stored = _done_before(scan, mask_path, fmt, stored_names)
    if stored is not None:
        result.status, result.reason, result.mask = "skipped", "mask exists", str(mask_path)
        _measure(result, stored.labels, stored.affine, names)
        return
    volume = scan.load()
    labels = predict_volume(model, volume, device=device, **options)
    fmt.write(labels, volume, mask_path, info)
    result.mask = str(mask_path)
    _measure(result, labels, volume.affine, names)


def _done_before(
    scan: Scan, mask: Path, fmt: MaskFormat, stored_names: tuple[str, ...]
) -> StoredMask | None:
    """The mask at ``mask`` when it is complete and fits the scan and the model, else None."""
    if not mask.is_file():
        return None
    try:
        header = scan.header()
        stored = fmt.read(mask, header)
    except FewLabelError as exc:
        logger.info("%s is predicted again: %s", mask, exc)
        return None
    shape, affine = header.display_geometry()
    same_spacing = np.allclose(
        np.linalg.norm(stored.affine[:3, :3], axis=0), np.linalg.norm(affine[:3, :3], axis=0),
        rtol=1e-3,
    )  # fmt: skip
    if stored.labels.shape != shape or not same_spacing or stored.class_names != stored_names:
        logger.info("%s does not fit %s or the model: predicted again", mask, scan)
        return None
    return stored


def _measure(result: ScanResult, labels: np.ndarray, affine: np.ndarray, names: list[str]) -> None:
    """Shape, spacing, and voxels and mL per foreground class of ``labels``."""
    counts = np.zeros(len(names), dtype=np.int64)
    for plane in labels:  # slice by slice: bincount of a whole CT would take 8 bytes a voxel
        counts += np.bincount(plane.ravel(), minlength=len(names))[: len(names)]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    result.shape = (int(labels.shape[0]), int(labels.shape[1]), int(labels.shape[2]))
    result.spacing_mm = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    result.voxels = {names[k]: int(counts[k]) for k in range(1, len(names))}
    result.ml = {names[k]: int(counts[k]) * voxel_mm3 / 1000 for k in range(1, len(names))}


def _gather(results: list[ScanResult], ranks: Ranks) -> list[ScanResult]:
    if ranks.world_size == 1:
        return results
    parts: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(parts, results)
    return sorted((r for part in parts for r in part), key=lambda r: r.index)


# --------------------------------------------------------------------- summary
def summary_rows(summary: CohortSummary, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per scan: the columns of ``summary.csv``."""
    rows = []
    for r in summary.results:
        row: dict[str, Any] = {
            "scan": r.scan,
            "mask": r.mask,
            "status": r.status,
            "reason": r.reason,
            "rank": r.rank,
            "shape": "x".join(str(n) for n in r.shape) if r.shape else "",
            "spacing_mm": "x".join(f"{s:.6g}" for s in r.spacing_mm) if r.spacing_mm else "",
        }
        for name in class_names:
            row[f"{name}_voxels"] = r.voxels.get(name, "")
        for name in class_names:
            row[f"{name}_mL"] = round(r.ml[name], 6) if name in r.ml else ""
        row["seconds"] = round(r.seconds, 3)
        rows.append(row)
    return rows


def write_summary(
    summary: CohortSummary, class_names: Sequence[str], details: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.json`` into the summary's folder, atomically."""
    csv_path, json_path = summary.out_dir / SUMMARY_CSV, summary.out_dir / SUMMARY_JSON
    rows = summary_rows(summary, class_names)
    columns = list(rows[0]) if rows else ["scan", "mask", "status", "reason"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    document = {
        **details,
        "processes": summary.processes,
        "seconds": round(summary.seconds, 3),
        "scans": len(summary.results),
        "done": summary.count("done"),
        "skipped": summary.count("skipped"),
        "failed": summary.count("failed"),
        "results": [asdict(r) for r in summary.results],
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path
