"""InVesalius 3 projects (``.inv3``): a gzipped tar of plists and raw arrays.

An ``.inv3`` holds ``main.plist`` (shape, spacing, modality), ``matrix.dat``
(raw int16 voxels, slice by slice) and ``mask_N.plist``/``mask_N.dat``
(uint8 masks, 0/255, one voxel larger on every axis: their first slice, row
and column are a border InVesalius keeps for its own bookkeeping).

The project stores **no orientation**. Axial slices are assumed: the slice
index rises toward the head (checked on the Debian example: the skull base
is at slice 0), rows run posterior -> anterior (InVesalius keeps images
flipped vertically; the head rest is at row 0), and columns run right -> left
as in DICOM, which cannot be checked on a symmetric head. The affine built
from these assumptions is exact up to that left/right ambiguity; say so when
reporting laterality on such a scan.

Nothing is extracted to disk and nothing is unpickled: members are read from
the archive in memory and the plists are parsed as XML.
"""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from nibabel import orientations as nio

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.limits import check_volume_size
from napari_fewlabel.io.volume import RAS_FROM_LPS, Volume, parse_modality

INVESALIUS_SUFFIX = ".inv3"
# A project's plists are a few KB; a larger one is damage (or a decompression bomb).
_MAX_PLIST_BYTES = 16 * 2**20


def is_invesalius_path(path: str | Path) -> bool:
    return str(path).lower().endswith(INVESALIUS_SUFFIX)


def read_invesalius_header(path: Path) -> ScanHeader:
    """Shape and geometry of an InVesalius project from its ``main.plist``; no voxel is read."""
    try:
        with tarfile.open(path, "r:*") as tar:
            member = next(
                (m for m in tar if m.isfile() and PurePosixPath(m.name).name == "main.plist"),
                None,
            )
            if member is None or member.size > _MAX_PLIST_BYTES:
                raise FewLabelError(
                    f"{path.name} has no usable main.plist: it is not a complete InVesalius "
                    "project; save it again from InVesalius."
                )
            handle = tar.extractfile(member)
            assert handle is not None  # regular files always have one
            main = plistlib.loads(handle.read())
        shape = tuple(int(s) for s in main["matrix"]["shape"])
        dtype = np.dtype(main["matrix"].get("dtype", "int16"))
        spacing = _spacing(main, path.name)
    except (FewLabelError, MemoryError):
        raise
    except Exception as exc:
        raise FewLabelError(
            f"Could not read {path.name} as an InVesalius project ({type(exc).__name__}: {exc}): "
            "the file may be truncated; save it again from InVesalius."
        ) from exc
    _check_shape(shape, dtype, path.name)
    read_bytes = check_volume_size(shape, dtype.itemsize, path.name, dtype=str(dtype))
    return ScanHeader(
        path=str(path),
        format="InVesalius",
        file_shape=(shape[2], shape[1], shape[0]),
        dtype=str(dtype),
        affine=RAS_FROM_LPS @ _lps_affine(shape, spacing),
        read_bytes=read_bytes,
        modality=parse_modality(str(main.get("modality", ""))) or "CT",
    )


def read_invesalius(path: Path) -> Volume:
    """The CT/MR volume of an InVesalius project."""
    volume, _ = _read(path, with_masks=False)
    return volume


def read_invesalius_masks(path: Path) -> tuple[Volume, dict[str, np.ndarray]]:
    """The volume and its masks (bool, display orientation), keyed by mask name."""
    return _read(path, with_masks=True)


def _read(path: Path, *, with_masks: bool) -> tuple[Volume, dict[str, np.ndarray]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str, limit: int) -> bytes:
                if name not in members:
                    raise FewLabelError(
                        f"{path.name} has no {name}: it is not a complete InVesalius project; "
                        "save it again from InVesalius."
                    )
                if members[name].size > limit:
                    raise FewLabelError(
                        f"{path.name}: its member {name} is {members[name].size} bytes, more "
                        f"than the {limit} its header allows; the project is damaged: save it "
                        "again from InVesalius."
                    )
                handle = tar.extractfile(members[name])
                assert handle is not None  # regular files always have one
                return handle.read()

            main = plistlib.loads(read("main.plist", limit=_MAX_PLIST_BYTES))
            shape = tuple(int(s) for s in main["matrix"]["shape"])  # (slices, rows, columns)
            dtype = np.dtype(main["matrix"].get("dtype", "int16"))
            _check_shape(shape, dtype, path.name)
            spacing = _spacing(main, path.name)
            expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
            check_volume_size(shape, dtype.itemsize, path.name, dtype=str(dtype))
            raw = read(main["matrix"]["filename"], limit=expected)
            masks: dict[str, np.ndarray] = {}
            if with_masks:
                for mask_plist_name in main.get("masks", {}).values():
                    info = plistlib.loads(read(mask_plist_name, limit=_MAX_PLIST_BYTES))
                    mask_shape = tuple(int(s) for s in info["mask_shape"])
                    _check_shape(mask_shape, np.dtype(np.uint8), path.name)
                    mask_bytes = int(np.prod(mask_shape, dtype=object))
                    mask = np.frombuffer(read(info["mask_file"], limit=mask_bytes), np.uint8)
                    mask = mask.reshape(mask_shape)
                    masks[str(info.get("name", mask_plist_name))] = mask[1:, 1:, 1:] > 0
    except (FewLabelError, MemoryError):
        raise
    except Exception as exc:  # tar, gzip, plist or key errors: the file is not what it claims
        raise FewLabelError(
            f"Could not read {path.name} as an InVesalius project ({type(exc).__name__}: {exc}): "
            "the file may be truncated; save it again from InVesalius."
        ) from exc
    if len(shape) != 3 or int(np.prod(shape)) * dtype.itemsize != len(raw):
        raise FewLabelError(
            f"{path.name}: the voxel data ({len(raw)} bytes) does not match the declared shape "
            f"{shape}; the project is damaged: save it again from InVesalius."
        )
    voxels = np.frombuffer(raw, dtype).reshape(shape)
    for name, mask in masks.items():
        if mask.shape != shape:
            raise FewLabelError(f"{path.name}: mask {name!r} does not match the volume's shape.")
    lps = _lps_affine(shape, spacing)
    header: dict[str, Any] = {
        "format": "InVesalius",
        "path": str(path),
        "name": str(main.get("name", "")),
        "orientation_assumed": "axial; rows posterior->anterior; columns right->left (unverified)",
    }
    modality = parse_modality(str(main.get("modality", ""))) or "CT"
    volume = Volume.from_file_array(
        voxels.transpose(2, 1, 0), RAS_FROM_LPS @ lps, modality=modality, header=header
    )
    # Masks are stored like matrix.dat (slice, row, column): same reorientation.
    display_masks = {
        name: nio.apply_orientation(m.transpose(2, 1, 0), volume.grid.to_display)
        for name, m in masks.items()
    }
    return volume, display_masks


def _spacing(main: dict[str, Any], name: str) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in main["spacing"])
    if len(spacing) != 3 or not all(0 < s < float("inf") for s in spacing):
        raise FewLabelError(
            f"{name}: main.plist declares voxel spacing {spacing}, not three positive sizes; "
            "the project is damaged: save it again from InVesalius."
        )
    return (spacing[0], spacing[1], spacing[2])


def _lps_affine(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """File axes (i = column -> L, j = row -> A (i.e. -P), k = slice -> S) -> LPS+ mm."""
    sx, sy, sz = spacing  # (column, row, slice) mm
    lps = np.diag([sx, -sy, sz, 1.0])
    lps[1, 3] = sy * (shape[1] - 1)  # row 0 is the most posterior: put the origin there
    return lps


def _check_shape(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    if len(shape) != 3 or min(shape) <= 0 or dtype.kind not in "iuf":
        raise FewLabelError(
            f"{name}: main.plist declares a {dtype} volume of shape {shape}, which is not a "
            "3D scan; the project is damaged: save it again from InVesalius."
        )
