"""Check NRRD and MetaImage text headers ourselves before SimpleITK sees them.

ITK trusts these headers: ``NDims = 99999`` or NRRD ``encoding: txt`` can
crash the process (a segfault no ``except`` can catch), ``data file:
/dev/zero`` with ``line skip: -5`` hangs it, and a detached header naming
``/etc/passwd`` shows the bytes of any file as voxels. This module parses the
header text (at most :data:`MAX_HEADER_BYTES`), accepts only the subset the
package supports -- a 3D volume (or 4D with one time point), known voxel
types, raw or gzip data in one regular file next to the header and large
enough for the declared size -- and raises :class:`FewLabelError` for
anything else. Only then is the file handed to ITK.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_fewlabel.errors import FewLabelError

#: A header longer than this is not a scan header.
MAX_HEADER_BYTES = 64 * 1024

# NRRD type names (NRRD0005 spec, "type:" field) -> numpy dtype.
_NRRD_TYPES: dict[str, str] = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "int8"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "uint8"),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "int16"
    ),
    **dict.fromkeys(
        ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "uint16"
    ),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "int32"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "uint32"),
    **dict.fromkeys(
        (
            "longlong",
            "long long",
            "long long int",
            "signed long long",
            "signed long long int",
            "int64",
            "int64_t",
        ),
        "int64",
    ),
    **dict.fromkeys(
        ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
        "uint64",
    ),
    "float": "float32",
    "double": "float64",
}
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}
_NRRD_TEXT_ENCODINGS = ("txt", "text", "ascii", "hex")

# MetaImage ElementType (MetaIO's MET_ValueEnumType) -> numpy dtype; MET_LONG is 4 bytes there.
_MHA_TYPES: dict[str, str] = {
    "MET_CHAR": "int8",
    "MET_UCHAR": "uint8",
    "MET_SHORT": "int16",
    "MET_USHORT": "uint16",
    "MET_INT": "int32",
    "MET_UINT": "uint32",
    "MET_LONG": "int32",
    "MET_ULONG": "uint32",
    "MET_LONG_LONG": "int64",
    "MET_ULONG_LONG": "uint64",
    "MET_FLOAT": "float32",
    "MET_DOUBLE": "float64",
}
_MAX_CHANNELS = 64


@dataclass(frozen=True)
class ItkHeader:
    """What a validated NRRD/MetaImage header declares.

    Attributes
    ----------
    format : {"NRRD", "MetaImage"}
    sizes : tuple of int
        Voxels along each file axis, fastest first (3 or 4 axes).
    dtype : numpy.dtype
        Stored type of one component.
    components : int
        Values per voxel (1 for a scalar scan).
    data_file : Path or None
        The detached data file, or None when the data follows the header.
    compressed : bool
    """

    format: str
    sizes: tuple[int, ...]
    dtype: np.dtype
    components: int
    data_file: Path | None
    compressed: bool

    @property
    def data_bytes(self) -> int:
        n = self.components * self.dtype.itemsize
        for s in self.sizes:
            n *= s
        return n


def parse_itk_header(path: Path) -> ItkHeader:
    """Validate the header of a ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file (no voxel is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES)
    except OSError as exc:
        raise FewLabelError(f"Cannot open {path.name} ({exc.strerror}): check the path.") from exc
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        return _nrrd(path, head)
    return _metaimage(path, head)


# ----------------------------------------------------------------------- NRRD
def _nrrd(path: Path, head: bytes) -> ItkHeader:
    name = path.name
    if not re.match(rb"NRRD000[1-5]\r?\n", head):
        raise FewLabelError(
            f"Could not read {name}: it does not start with a NRRD magic line (NRRD0001 to "
            "NRRD0005), so it is not a NRRD file: export the scan again."
        )
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None and path.suffix.lower() == ".nrrd" and len(head) >= MAX_HEADER_BYTES:
        raise FewLabelError(
            f"Could not read {name}: its header does not end within {MAX_HEADER_BYTES // 1024} "
            "KB (no blank line): the file is damaged; export it again."
        )
    header_bytes = head[: end.end()] if end else head
    text = header_bytes.decode("latin-1")
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line.strip() or line.startswith("#") or ":=" in line:
            continue  # blank, comment, or key/value pair (free metadata)
        key, sep, value = line.partition(":")
        if not sep:
            raise FewLabelError(
                f"Could not read {name}: header line {line[:60]!r} is not 'field: value'; "
                "the header is damaged: export the scan again."
            )
        fields[key.strip().lower()] = value.strip()

    def need(key: str) -> str:
        if key not in fields:
            raise FewLabelError(
                f"Could not read {name}: its header has no '{key}:' field, which NRRD "
                "requires: export the scan again."
            )
        return fields[key]

    dtype_name = _NRRD_TYPES.get(" ".join(need("type").lower().split()))
    if dtype_name is None:
        raise FewLabelError(
            f"Could not read {name}: voxel type {fields['type']!r} is not supported; "
            "save the scan with an integer or floating-point type."
        )
    ndim = _int(need("dimension"), "dimension", name)
    sizes = _sizes(need("sizes"), ndim, name)
    encoding = need("encoding").lower()
    if encoding in _NRRD_TEXT_ENCODINGS:
        raise FewLabelError(
            f"{name} stores its voxels as text ('encoding: {encoding}'), which this reader "
            "does not support: save it with raw or gzip encoding (e.g. from 3D Slicer)."
        )
    if encoding not in _NRRD_ENCODINGS:
        raise FewLabelError(
            f"{name} uses 'encoding: {encoding}', which this reader does not support: "
            "save it with raw or gzip encoding (e.g. from 3D Slicer)."
        )
    compressed = _NRRD_ENCODINGS[encoding] == "gzip"
    line_skip = _int(fields.get("line skip", fields.get("lineskip", "0")), "line skip", name)
    byte_skip = _int(fields.get("byte skip", fields.get("byteskip", "0")), "byte skip", name)
    if line_skip < 0:
        raise FewLabelError(
            f"Could not read {name}: 'line skip: {line_skip}' is negative; fix the header."
        )
    if byte_skip < -1 or (byte_skip == -1 and compressed):
        raise FewLabelError(
            f"Could not read {name}: 'byte skip: {byte_skip}' is not valid for "
            f"{encoding} encoding (only raw data may use -1); fix the header."
        )
    # A 4th axis may be time or a vector/colour axis; read_itk tells them apart from
    # ITK's own reading of the header, and the size check counts it either way.
    header = ItkHeader("NRRD", sizes, np.dtype(dtype_name), 1, None, compressed)

    data_spec = fields.get("data file", fields.get("datafile"))
    if data_spec is None:
        if end is None:
            raise FewLabelError(
                f"Could not read {name}: the header names no 'data file' and has no blank "
                "line before attached data; the file is incomplete: export it again."
            )
        available = path.stat().st_size - end.end()
        data_file = None
    else:
        data_file = _data_file(path, data_spec, "data file")
        available = data_file.stat().st_size
        header = ItkHeader("NRRD", sizes, np.dtype(dtype_name), 1, data_file, compressed)
    if not compressed:
        _check_raw_size(header, available - max(byte_skip, 0), name)
    return header


# ------------------------------------------------------------------ MetaImage
def _metaimage(path: Path, head: bytes) -> ItkHeader:
    name = path.name
    text = head.decode("latin-1")
    fields: dict[str, str] = {}
    header_end = None
    offset = 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.partition("=")
        if not sep:
            if line.strip():
                break  # not "Key = Value": not a MetaImage header line
            continue
        key, value = key.strip(), value.strip()
        fields[key] = value
        if key == "ElementDataFile":
            header_end = offset
            break
    if header_end is None:
        raise FewLabelError(
            f"Could not read {name} as MetaImage: no 'ElementDataFile = ...' line ends a "
            f"'Key = Value' header in its first {MAX_HEADER_BYTES // 1024} KB; the file is "
            "not MetaImage or is damaged: export it again."
        )

    def need(key: str) -> str:
        if key not in fields:
            raise FewLabelError(
                f"Could not read {name}: its MetaImage header has no '{key} = ...' line; "
                "export the scan again."
            )
        return fields[key]

    if fields.get("ObjectType", "Image").lower() != "image":
        raise FewLabelError(
            f"{name} holds a MetaIO {fields['ObjectType']!r} object, not an image: open a 3D scan."
        )
    ndim = _int(need("NDims"), "NDims", name)
    sizes = _sizes(need("DimSize"), ndim, name)
    element = need("ElementType").upper()
    if element.endswith("_ARRAY"):
        element = element[: -len("_ARRAY")]
    dtype_name = _MHA_TYPES.get(element)
    if dtype_name is None:
        raise FewLabelError(
            f"Could not read {name}: ElementType {fields['ElementType']!r} is not supported; "
            "save the scan with an integer or floating-point type."
        )
    components = _int(fields.get("ElementNumberOfChannels", "1"), "ElementNumberOfChannels", name)
    if not 1 <= components <= _MAX_CHANNELS:
        raise FewLabelError(
            f"Could not read {name}: ElementNumberOfChannels = {components} is not valid; "
            "fix the header."
        )
    if fields.get("BinaryData", "True").lower() not in ("true", "1"):
        raise FewLabelError(
            f"{name} stores its voxels as text (BinaryData = False), which this reader does "
            "not support: save it as binary MetaImage."
        )
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    if "CompressedDataSize" in fields:
        _int(fields["CompressedDataSize"], "CompressedDataSize", name)
    header_size = _int(fields.get("HeaderSize", "0"), "HeaderSize", name)
    if header_size < -1 or (header_size == -1 and compressed):
        raise FewLabelError(
            f"Could not read {name}: HeaderSize = {header_size} is not valid here "
            "(0 or more, or -1 for uncompressed data at the end of the file); fix the header."
        )
    spec = fields["ElementDataFile"]
    if spec.upper() == "LOCAL":
        data_file = None
        available = path.stat().st_size - header_end  # latin-1: one character per byte
    else:
        data_file = _data_file(path, spec, "ElementDataFile")
        available = data_file.stat().st_size
    header = ItkHeader("MetaImage", sizes, np.dtype(dtype_name), components, data_file, compressed)
    if not compressed:
        _check_raw_size(header, available - max(header_size, 0), name)
    return header


# -------------------------------------------------------------------- helpers
def _int(text: str, field: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise FewLabelError(
            f"Could not read {name}: its header's {field} {text[:40]!r} is not a whole "
            "number; the header is damaged: export the scan again."
        ) from None


def _sizes(text: str, ndim: int, name: str) -> tuple[int, ...]:
    if ndim in (1, 2):
        raise FewLabelError(
            f"Could not read {name}: it is {ndim}D where a 3D scan is needed; export the "
            "scan as one 3D volume."
        )
    if ndim not in (3, 4):
        raise FewLabelError(
            f"Could not read {name}: its header declares {ndim} dimensions where a 3D scan "
            "has 3; the header is damaged: export the scan again."
        )
    parts = text.split()
    if len(parts) != ndim:
        raise FewLabelError(
            f"Could not read {name}: its header declares {ndim} dimensions but {len(parts)} "
            f"sizes ({text[:60]!r}); the header is damaged: export the scan again."
        )
    sizes = tuple(_int(p, "size", name) for p in parts)
    if min(sizes) <= 0:
        raise FewLabelError(
            f"Could not read {name}: its header declares sizes {sizes}, and every size must "
            "be positive (a dimension of size 0 holds no scan): export the scan again."
        )
    return sizes


def _data_file(header_path: Path, spec: str, field: str) -> Path:
    """The detached data file, refused unless it is a regular file in the header's folder."""
    name = header_path.name
    if spec.upper().startswith("LIST") or "%" in spec or len(spec.split()) > 1:
        raise FewLabelError(
            f"{name} spreads its voxels over several files ({field}: {spec[:80]!r}), which "
            "this reader does not support: save the scan as one file."
        )
    if "\x00" in spec:
        raise FewLabelError(
            f"Could not read {name}: its data file name ({field}) holds a null byte, so the "
            "header is damaged: export the scan again."
        )
    folder = Path(os.path.realpath(header_path.parent))
    target = Path(os.path.realpath(folder / spec))
    if not target.is_relative_to(folder):
        raise FewLabelError(
            f"{name} points to voxel data outside its own folder ({field}: {spec!r}); for "
            "safety only a data file next to the header is read: put the data file beside "
            "the header and name it without a folder."
        )
    try:
        mode = target.stat().st_mode
    except OSError:
        raise FewLabelError(
            f"Could not read {name}: its header points to a missing data file ({spec!r}); "
            "copy the data file beside the header, or export the scan again."
        ) from None
    if not stat.S_ISREG(mode):
        raise FewLabelError(
            f"{name} names {spec!r} as its data file, which is not a regular file (a device, "
            "pipe or folder): point the header to the scan's data file."
        )
    return target


def _check_raw_size(header: ItkHeader, available: int, name: str) -> None:
    if available < header.data_bytes:
        where = header.data_file.name if header.data_file else name
        raise FewLabelError(
            f"Could not read {name}: {where} holds {max(available, 0)} bytes of voxel data "
            f"where the header declares {header.data_bytes} ({' x '.join(map(str, header.sizes))}"
            f" {header.dtype}); the file is truncated: copy or export it again."
        )
