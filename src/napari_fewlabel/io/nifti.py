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
from nibabel import Nifti1Header, Nifti1Image, Nifti2Header, Nifti2Image
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.volumeutils import apply_read_scaling

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.io.header import ScanHeader
from napari_fewlabel.io.limits import check_volume_size
from napari_fewlabel.io.volume import Volume, guess_modality

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Voxel data is decompressed this much at a time (a temporary copy of this size).
_CHUNK_BYTES = 64 * 2**20
# Header extensions (text, JSON, CIFTI XML) larger than this are not a scan's.
_MAX_EXTENSION_BYTES = 256 * 2**20


def is_nifti_path(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti_header(path: Path) -> ScanHeader:
    """The header of a 3D NIfTI file; no voxel is read."""
    img, shape, read_bytes = _open(path)
    header = img.header
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    return ScanHeader(
        path=str(path),
        format="NIfTI",
        file_shape=shape,
        dtype=str(header.get_data_dtype()),
        affine=np.asarray(img.affine, dtype=np.float64),
        read_bytes=read_bytes,
        details={"qform_code": qform_code, "sform_code": sform_code},
    )


def read_nifti(path: Path) -> Volume:
    """Read a 3D NIfTI file into a display-orientation :class:`Volume`."""
    img, shape, _ = _open(path)
    header = img.header
    try:
        data = _read_voxels(path, _proxy(img)).reshape(shape, order="F")
        qform = header.get_qform(coded=True)
        sform = header.get_sform(coded=True)
        affine = img.affine
    except (FewLabelError, MemoryError):
        raise
    except Exception as exc:  # untrusted bytes: any parser failure is the file's fault
        raise _unreadable(path, exc) from exc
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


def _open(path: Path) -> tuple[Nifti1Image | Nifti2Image, tuple[int, int, int], int]:
    """The image with its header only, its 3D shape, and the bytes reading it needs.

    Everything that can be told from the header is refused here, before a voxel is read.
    """
    try:
        _check_extensions_size(path)
        img = nib.load(str(path))
        if not isinstance(img, Nifti1Image | Nifti2Image):
            raise FewLabelError(f"{path.name} is not a NIfTI image.")
        header = img.header
        full_shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        slope, inter = float(_proxy(img).slope), float(_proxy(img).inter)
    except FewLabelError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if full_shape and min(full_shape) == 0:
        raise FewLabelError(
            f"{path.name} has a dimension of size 0 (shape {full_shape}), so it holds no "
            "voxels: export the scan again."
        )
    shape = _squeeze_to_3d(full_shape, path.name)
    offset, header_size = _proxy(img).offset, int(header.sizeof_hdr)
    if offset < header_size:
        raise FewLabelError(
            f"{path.name} says its voxels start at byte {offset} (vox_offset {offset} lies "
            f"inside its {header_size}-byte header): the header is damaged; export the scan "
            "again."
        )
    if dtype.kind == "c" or dtype.fields is not None:
        raise FewLabelError(
            f"{path.name} holds {dtype} voxels (complex or RGB): open a scalar (greyscale) 3D scan."
        )
    scaled = (slope, inter) != (1.0, 0.0)
    # The stored array, plus the floating-point copy that scaling makes (float64 at most).
    per_voxel = dtype.itemsize + (8 if scaled else 0)
    read_bytes = check_volume_size(full_shape, per_voxel, path.name, dtype=str(dtype))
    return img, shape, read_bytes


def _read_voxels(path: Path, stored: ArrayProxy) -> np.ndarray:
    """The scaled voxels, read into one preallocated array.

    nibabel reads a ``.nii.gz`` through ``GzipFile.readinto``, which decodes the
    whole payload into a temporary ``bytes`` first: twice the volume's memory.
    Reading in chunks keeps the peak at the array itself, and lets us see a gzip
    stream that goes on past the declared voxels (a decompression bomb behind a
    small header, or a header that does not describe its data).
    """
    raw = np.empty(stored.shape, dtype=stored.dtype, order="F")
    buffer = raw.reshape(-1, order="A").view(np.uint8).data  # a view: no copy
    with ImageOpener(str(path)) as fileobj:
        fileobj.seek(stored.offset)
        filled = 0
        while filled < len(buffer):
            n = fileobj.readinto(buffer[filled : filled + _CHUNK_BYTES])
            if not n:
                break
            filled += n
        extra = fileobj.read(1) if _is_gzip(path) else b""
    if filled < len(buffer):
        raise FewLabelError(
            f"{path.name} holds {filled} bytes of voxel data where its header declares "
            f"{len(buffer)} ({_describe(stored)}): the file is truncated; copy or export it "
            "again."
        )
    if extra:
        raise FewLabelError(
            f"{path.name} holds more voxel data than its header declares ({_describe(stored)}): "
            "the header does not describe this data (a damaged or forged file); export the "
            "scan again."
        )
    # As nibabel's ArrayProxy does: scale factors in their own type, scaled data upcast.
    slope, inter = np.asanyarray(stored.slope), np.asanyarray(stored.inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(raw, slope, inter)


def _is_gzip(path: Path) -> bool:
    return str(path).lower().endswith(".gz")


def _describe(stored: ArrayProxy) -> str:
    return f"{' x '.join(str(n) for n in stored.shape)} {stored.dtype.name}"


def _check_extensions_size(path: Path) -> None:
    """Refuse a header whose extensions (read whole by nib.load) would be a bomb of their own.

    The extensions fill the bytes between the header and ``vox_offset``, which
    a forged header can put gigabytes away; ours (classes, marks) take a few KB.
    """
    with ImageOpener(str(path)) as fileobj:
        raw = fileobj.read(Nifti2Header.sizeof_hdr)
    for klass in (Nifti1Header, Nifti2Header):
        if klass.may_contain_header(raw):
            header = klass(raw[: klass.sizeof_hdr], check=False)
            extensions = float(header["vox_offset"]) - klass.sizeof_hdr
            if extensions > _MAX_EXTENSION_BYTES:
                raise FewLabelError(
                    f"{path.name} declares {extensions / 1e6:.0f} MB of header extensions "
                    f"before its voxels (vox_offset {float(header['vox_offset']):.0f}), more "
                    f"than the {_MAX_EXTENSION_BYTES / 1e6:.0f} MB this reader accepts: the "
                    "header is damaged or forged; export the scan again."
                )
            return


def _proxy(img: Nifti1Image | Nifti2Image) -> ArrayProxy:
    """The lazy array nib.load made: the voxels' shape, type, offset and scaling."""
    proxy = img.dataobj
    assert isinstance(proxy, ArrayProxy)  # nib.load of a file always makes one
    return proxy


def _unreadable(path: Path, exc: Exception) -> FewLabelError:
    return FewLabelError(
        f"Could not read {path.name} as NIfTI ({type(exc).__name__}: {str(exc)[:200]}). The "
        "file may be truncated or not NIfTI: export it again from the scanner or viewer."
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


def _squeeze_to_3d(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    # A trailing singleton time/channel axis is common in 3D exports; drop it.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise FewLabelError(
            f"{name} is 4D (shape {shape}: {shape[3]} time points or channels). "
            "Extract one 3D volume first (e.g. `fslroi` or nibabel's `image.slicer`)."
        )
    if len(shape) != 3:
        raise FewLabelError(
            f"{name} has {len(shape)} dimensions (shape {shape}); a 3D scan is needed."
        )
    return (shape[0], shape[1], shape[2])


def _text(value: Any) -> str:
    raw = value.item() if isinstance(value, np.ndarray) else value
    if isinstance(raw, bytes):
        return raw.split(b"\x00", 1)[0].decode("latin-1", errors="replace").strip()
    return "" if raw is None else str(raw)
