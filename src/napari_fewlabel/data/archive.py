"""Unlabelled scans for pretraining: slices sampled on the fly, memory bounded.

:class:`SliceArchive` indexes a list of files and folders (NIfTI, NRRD,
MetaImage, InVesalius, DICOM series folders) by path, shape and spacing,
reading only headers where the format allows it (NIfTI, NRRD, MetaImage);
DICOM folders and InVesalius projects are read once, one at a time, to learn
their shape. Voxels are loaded when a slice of the scan is first asked for
and kept in a least-recently-used cache bounded by a number of scans *and* a
number of megabytes, so memory does not grow with the archive.

Slices are taken along all three axes (fine-tuning may slice along any axis,
and it triples the data), except along axes whose slices would have very
anisotropic pixels (a 6.5 mm-thick axial series gives 0.8 x 6.5 mm pixels in
its sagittal slices: mostly interpolation, skipped by default). Each slice is
a window of ``in_slices`` adjacent slices (the fine-tuning network's 2.5D
input), normalised per modality as fine-tuning normalises it (CT: HU window;
MR: percentiles + z-score, fitted on the whole scan), and resized so that its
longer side is ``slice_size``, then padded to a square with background.

:class:`SliceBlocks` is the map-style dataset training uses with
:class:`torch.utils.data.DistributedSampler`: an item is a *block* of a few
random slices of one scan, so a batch touches a few scans, not one per
slice, and the cache is not thrashed when the archive is larger than it.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from napari_fewlabel.data.normalization import IntensityMapping, NormalizationConfig, fit_intensity
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.dicom import looks_like_dicom
from napari_fewlabel.io.invesalius import is_invesalius_path
from napari_fewlabel.io.itk import is_itk_path
from napari_fewlabel.io.load import load_volume
from napari_fewlabel.io.nifti import is_nifti_path
from napari_fewlabel.io.volume import DISPLAY_AXCODES, RAS_FROM_LPS, FileGrid, Modality

_DISPLAY_ORNT = nio.axcodes2ornt(DISPLAY_AXCODES)


@dataclass(frozen=True)
class ArchiveScan:
    """One scan of the archive, known by its header.

    Attributes
    ----------
    path : Path
        File, or DICOM series folder.
    shape : tuple of int
        ``(z, y, x)`` in display orientation.
    spacing_mm : tuple of float
        Voxel size along ``(z, y, x)``.
    """

    path: Path
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def nbytes_estimate(self) -> int:
        return int(np.prod(self.shape)) * 2

    def slice_axes(self, max_anisotropy: float, min_side: int) -> list[int]:
        """Axes along which slices are usable: near-square pixels, both sides >= ``min_side``."""
        axes = []
        for axis in range(3):
            others = [a for a in range(3) if a != axis]
            (sa, sb), (na, nb) = (
                (self.spacing_mm[a] for a in others),
                (self.shape[a] for a in others),
            )
            if max(sa, sb) / min(sa, sb) <= max_anisotropy and min(na, nb) >= min_side:
                axes.append(axis)
        return axes


def find_scans(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Scan files and DICOM series folders under ``paths`` (files are taken as they are).

    A folder is searched recursively; a folder that directly holds DICOM
    files is one series (its sub-folders are not searched further, as the
    DICOM reader takes the largest series under it).

    Raises
    ------
    FewLabelError
        When a path does not exist or no scan is found.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FewLabelError(f"No file or folder at {path}: check the path.")
        if path.is_file():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            folder = Path(root)
            names = sorted(n for n in files if not n.startswith("."))
            if any(looks_like_dicom(folder / n) for n in names[:50]):
                found.append(folder)
                dirs.clear()
                continue
            found.extend(folder / n for n in names if _is_volume_file(n))
    if not found:
        raise FewLabelError(
            "No scans found in "
            + ", ".join(str(p) for p in paths)
            + ": give NIfTI, NRRD, MetaImage or InVesalius files, or DICOM series folders."
        )
    return found


def _is_volume_file(name: str) -> bool:
    return is_nifti_path(name) or is_itk_path(name) or is_invesalius_path(name)


def _display_geometry(
    shape: Sequence[int], affine: np.ndarray
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Display-orientation shape and spacing from a file's shape and affine (no voxels)."""
    to_display = nio.ornt_transform(nio.io_orientation(affine), _DISPLAY_ORNT)
    grid = FileGrid((int(shape[0]), int(shape[1]), int(shape[2])), affine, to_display)
    file_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = [0.0, 0.0, 0.0]
    for file_axis, display_axis in enumerate(to_display[:, 0].astype(int)):
        spacing[display_axis] = float(file_spacing[file_axis])
    return grid.display_shape(), (spacing[0], spacing[1], spacing[2])


def read_scan_header(path: Path) -> ArchiveScan:
    """Shape and spacing of a scan, from its header where the format has one."""
    name = path.name
    try:
        if path.is_file() and is_nifti_path(name):
            img = nib.load(str(path))
            shape = tuple(int(s) for s in getattr(img, "shape", ()))
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if isinstance(img, nib.Nifti1Image | nib.Nifti2Image) and len(shape) == 3:
                display_shape, spacing = _display_geometry(shape, np.asarray(img.affine))
                return ArchiveScan(path, display_shape, spacing)
        elif path.is_file() and is_itk_path(name):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            if len(size) == 3 or (len(size) == 4 and size[3] == 1):
                direction = np.asarray(reader.GetDirection(), dtype=np.float64)
                n = len(size)
                lps = np.eye(4)
                lps[:3, :3] = (direction.reshape(n, n) * np.asarray(reader.GetSpacing()))[:3, :3]
                display_shape, spacing = _display_geometry(size[:3], RAS_FROM_LPS @ lps)
                return ArchiveScan(path, display_shape, spacing)
    except Exception as exc:  # untrusted headers: any parser failure is the file's fault
        raise FewLabelError(
            f"Could not read the header of {path} ({type(exc).__name__}: {exc}): remove it from "
            "the pretraining data or export it again."
        ) from exc
    # DICOM series, InVesalius projects and odd shapes: read the scan once (then let it go).
    volume = load_volume(path)
    return ArchiveScan(path, volume.shape, volume.spacing_mm)


@dataclass
class _Loaded:
    array: np.ndarray  # (z, y, x) raw voxel values
    mapping: IntensityMapping
    modality: Modality


class SliceArchive:
    """Lazily loaded scans, sliced along their usable axes.

    Parameters
    ----------
    paths : iterable of path-like
        Files and folders (see :func:`find_scans`).
    in_slices : int
        Adjacent slices per window (channels of the network input; odd).
    slice_size : int
        Side of the square a slice is fitted to (shrunk if larger, padded).
    ct_window_hu : tuple of float
        HU window of the CT normalisation (fine-tuning's default).
    max_anisotropy : float
        Skip slices whose pixels are longer than wide by more than this.
    min_side : int
        Skip slices with a side shorter than this many voxels.
    cache_scans : int
        At most this many scans are held in memory...
    cache_mb : float
        ...and at most this many megabytes of voxels (at least one scan is
        always kept, however large).

    Attributes
    ----------
    scans : list of ArchiveScan
    axes : list of list of int
        Usable slice axes of each scan.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        in_slices: int = 3,
        slice_size: int = 256,
        ct_window_hu: tuple[float, float] = (-300.0, 400.0),
        max_anisotropy: float = 3.0,
        min_side: int = 16,
        cache_scans: int = 4,
        cache_mb: float = 1024.0,
    ) -> None:
        if in_slices < 1 or in_slices % 2 == 0:
            raise FewLabelError(f"in_slices must be an odd number >= 1, got {in_slices}.")
        if cache_scans < 1:
            raise FewLabelError(f"cache_scans must be at least 1, got {cache_scans}.")
        self.in_slices = in_slices
        self.slice_size = slice_size
        self.ct_window_hu = ct_window_hu
        self.cache_scans = cache_scans
        self.cache_bytes = int(cache_mb * 2**20)
        self.scans = [read_scan_header(p) for p in find_scans(paths)]
        self.axes = [s.slice_axes(max_anisotropy, min_side) for s in self.scans]
        self.slice_counts = [
            sum(s.shape[a] for a in axes) for s, axes in zip(self.scans, self.axes, strict=True)
        ]
        if sum(self.slice_counts) == 0:
            raise FewLabelError(
                "None of the scans has usable slices (too small, or too anisotropic): give "
                "larger scans or allow more anisotropy."
            )
        self._cache: OrderedDict[int, _Loaded] = OrderedDict()
        # Fitted normalisations and modalities are tiny: keep them for scans evicted from the cache.
        self._mappings: dict[int, tuple[IntensityMapping, Modality]] = {}
        self.loads = 0

    def __len__(self) -> int:
        """Number of usable slices (all scans, all usable axes)."""
        return sum(self.slice_counts)

    @property
    def cached_scans(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        return sum(entry.array.nbytes for entry in self._cache.values())

    def modalities(self) -> dict[str, Modality]:
        """Modality of each scan loaded so far, by path."""
        return {str(self.scans[i].path): m for i, (_, m) in self._mappings.items()}

    def survey(self) -> dict[str, Modality]:
        """Modality of every scan, reading once (one at a time, not cached) those not loaded yet.

        Data-loading workers load scans in their own processes, so the process
        that writes the model card may have loaded none; the card must still
        say what the encoder was trained on.
        """
        for i, scan in enumerate(self.scans):
            if i not in self._mappings:
                volume = load_volume(scan.path)
                config = NormalizationConfig.for_modality(
                    volume.modality, window_hu=self.ct_window_hu
                )
                self._mappings[i] = (fit_intensity(volume.array, config), volume.modality)
        return self.modalities()

    def _load(self, scan: int) -> _Loaded:
        if scan in self._cache:
            self._cache.move_to_end(scan)
            return self._cache[scan]
        volume = load_volume(self.scans[scan].path)
        self.loads += 1
        if volume.shape != self.scans[scan].shape:
            raise FewLabelError(
                f"{self.scans[scan].path} changed while pretraining (shape {volume.shape}, "
                f"indexed as {self.scans[scan].shape}): leave the data alone during training."
            )
        if scan not in self._mappings:
            config = NormalizationConfig.for_modality(volume.modality, window_hu=self.ct_window_hu)
            self._mappings[scan] = (fit_intensity(volume.array, config), volume.modality)
        mapping, modality = self._mappings[scan]
        entry = _Loaded(np.asarray(volume.array), mapping, modality)
        self._cache[scan] = entry
        while len(self._cache) > 1 and (
            len(self._cache) > self.cache_scans or self.cached_bytes > self.cache_bytes
        ):
            self._cache.popitem(last=False)
        return entry

    def window(self, scan: int, axis: int, index: int) -> tuple[torch.Tensor, float]:
        """The normalised window of slices around ``index`` along ``axis``.

        The slices are resized (aspect kept, antialiased when shrinking) so
        that their longer side is ``slice_size``, then padded to a square with
        the scan's background value. Unlike fine-tuning, small slices are
        enlarged: views are cut relative to the square, and a small scan
        should not be mostly padding.

        Returns
        -------
        window : Tensor, shape (in_slices, slice_size, slice_size), float32
        foreground : float
            Fraction of the middle slice (before padding) more than half a
            unit above the background: 0.5 SD for MR, 175 HU for CT with the
            default window.
        """
        entry = self._load(scan)
        n = entry.array.shape[axis]
        half = self.in_slices // 2
        indices = np.clip(np.arange(index - half, index + half + 1), 0, n - 1)
        block = entry.mapping(np.moveaxis(np.take(entry.array, indices, axis=axis), axis, 0))
        background = float(entry.mapping.background)
        foreground = float(np.mean(block[half] > background + 0.5))
        h, w = block.shape[1:]
        scale = self.slice_size / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        resized = F.interpolate(
            torch.from_numpy(block)[None], size=size, mode="bilinear", antialias=scale < 1,
            align_corners=False,
        )[0]  # fmt: skip
        top, left = (self.slice_size - size[0]) // 2, (self.slice_size - size[1]) // 2
        window = torch.full((self.in_slices, self.slice_size, self.slice_size), background)
        window[:, top : top + size[0], left : left + size[1]] = resized
        return window, foreground

    def random_slice(self, scan: int, rng: np.random.Generator) -> tuple[int, int]:
        """A uniformly random usable ``(axis, index)`` of ``scan``."""
        axes = self.axes[scan]
        sizes = np.array([self.scans[scan].shape[a] for a in axes])
        flat = int(rng.integers(0, sizes.sum()))
        position = int(np.searchsorted(np.cumsum(sizes), flat, side="right"))
        return axes[position], flat - int(sizes[:position].sum())

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able list of the scans (for model cards)."""
        modalities = self.modalities()
        return [
            {
                "path": str(s.path),
                "shape_zyx": list(s.shape),
                "spacing_mm_zyx": [round(v, 4) for v in s.spacing_mm],
                "slice_axes": axes,
                "modality": modalities.get(str(s.path), "not loaded"),
            }
            for s, axes in zip(self.scans, self.axes, strict=True)
        ]


class SliceBlocks(torch.utils.data.Dataset[torch.Tensor]):
    """Blocks of random slices, one scan per block: the dataset pretraining samples.

    Item ``i`` belongs to one scan (each scan owns ``ceil(slices / block_size)``
    items, so scans are visited in proportion to their usable slices) and
    holds ``block_size`` random windows of it. Which slices it holds is drawn
    from ``(seed, epoch, i)``: index the dataset with ``(epoch, i)`` pairs
    (:class:`EpochIndices` makes them from a sampler), so a
    :class:`~torch.utils.data.DistributedSampler` that gives ranks disjoint
    items gives them disjoint draws, and data-loading workers that live
    across epochs still draw new slices each epoch.

    Parameters
    ----------
    archive : SliceArchive
    block_size : int
        Windows per item.
    seed : int
    min_foreground : float
        Redraw (up to three times) slices where less than this fraction of the
        middle slice is above the background (air, outside the body).
    """

    def __init__(
        self,
        archive: SliceArchive,
        block_size: int = 8,
        seed: int = 0,
        min_foreground: float = 0.1,
    ) -> None:
        self.archive = archive
        self.block_size = block_size
        self.seed = seed
        self.min_foreground = min_foreground
        owners = [
            np.full(math.ceil(count / block_size), scan, dtype=np.int64)
            for scan, count in enumerate(archive.slice_counts)
        ]
        self.owner = np.concatenate(owners)

    def __len__(self) -> int:
        return int(self.owner.size)

    def __getitem__(self, key: tuple[int, int] | int) -> torch.Tensor:
        """``(block_size, in_slices, slice_size, slice_size)`` windows of one scan.

        ``key`` is ``(epoch, item)``, or ``item`` alone for epoch 0.
        """
        epoch, item = key if isinstance(key, tuple) else (0, key)
        scan = int(self.owner[item])
        rng = np.random.default_rng([self.seed, epoch, item])
        windows = []
        for _ in range(self.block_size):
            for _attempt in range(4):
                axis, index = self.archive.random_slice(scan, rng)
                window, foreground = self.archive.window(scan, axis, index)
                if foreground >= self.min_foreground:
                    break
            windows.append(window)
        return torch.stack(windows)


class EpochIndices(torch.utils.data.Sampler[tuple[int, int]]):
    """``(epoch, item)`` pairs from a sampler of items, for :class:`SliceBlocks`.

    Parameters
    ----------
    sampler : DistributedSampler
        Gives this rank's items; its epoch is set here before each pass.
    """

    def __init__(self, sampler: torch.utils.data.DistributedSampler[Any]) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def collate_blocks(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate blocks ``(k, C, S, S)`` into one batch ``(sum k, C, S, S)``."""
    return torch.cat(list(blocks))
