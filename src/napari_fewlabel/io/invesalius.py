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
from napari_fewlabel.io.volume import RAS_FROM_LPS, Volume, parse_modality

INVESALIUS_SUFFIX = ".inv3"


def is_invesalius_path(path: str | Path) -> bool:
    return str(path).lower().endswith(INVESALIUS_SUFFIX)


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

            def read(name: str) -> bytes:
                if name not in members:
                    raise FewLabelError(
                        f"{path.name} has no {name}: it is not a complete InVesalius project; "
                        "save it again from InVesalius."
                    )
                handle = tar.extractfile(members[name])
                assert handle is not None  # regular files always have one
                return handle.read()

            main = plistlib.loads(read("main.plist"))
            shape = tuple(int(s) for s in main["matrix"]["shape"])  # (slices, rows, columns)
            dtype = np.dtype(main["matrix"].get("dtype", "int16"))
            raw = read(main["matrix"]["filename"])
            masks: dict[str, np.ndarray] = {}
            if with_masks:
                for mask_plist_name in main.get("masks", {}).values():
                    info = plistlib.loads(read(mask_plist_name))
                    mask_shape = tuple(int(s) for s in info["mask_shape"])
                    mask = np.frombuffer(read(info["mask_file"]), np.uint8).reshape(mask_shape)
                    masks[str(info.get("name", mask_plist_name))] = mask[1:, 1:, 1:] > 0
    except FewLabelError:
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
    sx, sy, sz = (float(s) for s in main["spacing"])  # (column, row, slice) mm
    # LPS affine for file axes (i = column -> L, j = row -> A (i.e. -P), k = slice -> S).
    lps = np.diag([sx, -sy, sz, 1.0])
    lps[1, 3] = sy * (shape[1] - 1)  # row 0 is the most posterior: put the origin there
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
