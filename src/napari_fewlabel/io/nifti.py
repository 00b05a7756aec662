"""NIfTI-1/2 in and out with nibabel, the format's reference implementation.

nibabel is used rather than ITK for NIfTI because it applies the standard's
qform/sform rules exactly (what every other NIfTI tool sees) and it reads the
non-orthonormal affines that ITK refuses. Exports copy the source's qform and
sform with their codes, so a mask lands on the scan in any viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.io.volume import Volume, guess_modality

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path) -> Volume:
    """Read a 3D NIfTI file into a display-orientation :class:`Volume`."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise FewLabelError(f"{path.name} is not a NIfTI image.")
        data = np.asanyarray(img.dataobj)
        header = img.header
        qform = header.get_qform(coded=True)
        sform = header.get_sform(coded=True)
        affine = img.affine
    except FewLabelError:
        raise
    except Exception as exc:  # untrusted bytes: any parser failure is the file's fault
        raise FewLabelError(
            f"Could not read {path.name} as NIfTI ({type(exc).__name__}: {exc}). The file "
            "may be truncated or not NIfTI: export it again from the scanner or viewer."
        ) from exc
    data = _squeeze_to_3d(data, path.name)
    if np.iscomplexobj(data) or data.dtype.fields is not None:
        raise FewLabelError(
            f"{path.name} holds {data.dtype} voxels (complex or RGB): open a scalar "
            "(greyscale) 3D scan."
        )
    info: dict[str, Any] = {
        "format": "NIfTI",
        "path": str(path),
        "descrip": _text(header.get("descrip")),
        "qform_code": int(qform[1]),
        "sform_code": int(sform[1]),
        "dtype": str(data.dtype),
    }
    return Volume.from_file_array(
        data,
        affine,
        modality=guess_modality(data),
        header=info,
        qform=(qform[0], int(qform[1])),
        sform=(sform[0], int(sform[1])),
    )


def write_nifti(
    file_array: np.ndarray,
    like: Volume,
    path: Path,
    *,
    is_label: bool,
    extensions: Sequence[nib.nifti1.Nifti1Extension] = (),
) -> None:
    """Write an array already in the file's voxel order with ``like``'s header geometry."""
    grid = like.grid
    img = nib.Nifti1Image(file_array, grid.affine)
    hdr = img.header
    for extension in extensions:
        hdr.extensions.append(extension)
    # Copy the source's transforms and codes verbatim; a code of 0 means "unset".
    img.set_qform(grid.qform if grid.qform is not None else grid.affine, code=grid.qform_code)
    img.set_sform(grid.sform if grid.sform is not None else grid.affine, code=grid.sform_code)
    hdr.set_xyzt_units(xyz="mm")
    if is_label:
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, float(file_array.max(initial=0))
    hdr["descrip"] = b"napari-fewlabel"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _squeeze_to_3d(data: np.ndarray, name: str) -> np.ndarray:
    # A trailing singleton time/channel axis is common in 3D exports; drop it.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise FewLabelError(
            f"{name} is 4D (shape {data.shape}: {data.shape[3]} time points or channels). "
            "Extract one 3D volume first (e.g. `fslroi` or nibabel's `image.slicer`)."
        )
    if data.ndim != 3:
        raise FewLabelError(
            f"{name} has {data.ndim} dimensions (shape {data.shape}); a 3D scan is needed."
        )
    return data


def _text(value: Any) -> str:
    raw = value.item() if isinstance(value, np.ndarray) else value
    if isinstance(raw, bytes):
        return raw.split(b"\x00", 1)[0].decode("latin-1", errors="replace").strip()
    return "" if raw is None else str(raw)
