"""What a mask file says besides its voxels: is it a mask, its classes, its empty slices.

A mask written by napari-fewlabel keeps the class names and colours, and the
slices the annotator checked and found without any structure ("marked
empty", trained as background), in a NIfTI header extension. Reopening the
file gives them back: the napari reader restores the annotation layer, and
``fewlabel finetune`` uses the marks unless ``--empty-slices`` is given.
ITK-SNAP, 3D Slicer, FSLeyes and nibabel skip the extension; voxels and
geometry are plain NIfTI.

The extension has code 6 ("comment", free text in the NIfTI-1 registry) and
holds UTF-8 JSON::

    {"napari-fewlabel": {"version": 1,
                         "classes": [{"index": 0, "name": "background", "color": [0, 0, 0]}, ...],
                         "empty_slices": {"axis": 0, "slices": [3, 17]}}}

Slice indices count along the display axes of :class:`~napari_fewlabel.io.Volume`
(axis 0 inferior->superior, 1 anterior->posterior, 2 right->left), the way
napari and ``fewlabel finetune --empty-slices`` number them, not along the
file's own voxel order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.nifti import is_nifti_path
from napari_fewlabel.io.volume import Volume

log = logging.getLogger(__name__)

#: NIfTI-1 extension code 6: "comment" (free text).
EXTENSION_CODE = 6
#: Top-level JSON key that marks the extension as ours.
EXTENSION_KEY = "napari-fewlabel"
#: NIfTI intent code 1002, NIFTI_INTENT_LABEL: "the values are labels".
NIFTI_INTENT_LABEL = 1002
#: A file of integers with at most this many distinct values (in a sample) is a mask.
MAX_MASK_VALUES = 16


class _ClassLike(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MaskInfo:
    """Classes and empty-slice marks of an annotation or prediction.

    Attributes
    ----------
    classes : tuple of mapping
        ``{"index", "name", "color"}`` per class, background first (as
        :meth:`SegmentationClass.to_dict` writes them); empty if unknown.
    empty_axis : int
        Display axis along which ``empty_slices`` count.
    empty_slices : tuple of int
        Slices checked and found without any structure.
    """

    classes: tuple[Mapping[str, Any], ...] = ()
    empty_axis: int = 0
    empty_slices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.empty_axis not in (0, 1, 2):
            raise ValueError(f"empty_axis must be 0, 1 or 2, got {self.empty_axis}")
        for c in self.classes:
            if not {"index", "name", "color"} <= set(c):
                raise ValueError(f"a class needs index, name and color, got {dict(c)}")

    @classmethod
    def of_classes(cls, classes: Iterable[_ClassLike]) -> MaskInfo:
        """Info naming ``classes`` (e.g. a model card's :class:`SegmentationClass` es)."""
        return cls(classes=tuple(c.to_dict() for c in classes))

    @property
    def is_empty(self) -> bool:
        return not self.classes and not self.empty_slices

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """Raise FewLabelError if a marked slice lies outside a mask of ``shape``."""
        n = shape[self.empty_axis]
        outside = [i for i in self.empty_slices if not 0 <= i < n]
        if outside:
            raise FewLabelError(
                f"Slices {outside} are marked empty but axis {self.empty_axis} of the mask has "
                f"{n} slices (0-{n - 1}): unmark them before saving."
            )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": 1}
        if self.classes:
            out["classes"] = [
                {"index": int(c["index"]), "name": str(c["name"]), "color": list(c["color"])}
                for c in self.classes
            ]
        if self.empty_slices:
            out["empty_slices"] = {
                "axis": self.empty_axis,
                "slices": sorted(int(i) for i in self.empty_slices),
            }
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MaskInfo:
        empty = d.get("empty_slices") or {}
        return cls(
            classes=tuple(dict(c) for c in d.get("classes", ())),
            empty_axis=int(empty.get("axis", 0)),
            empty_slices=tuple(int(i) for i in empty.get("slices", ())),
        )


def nifti_extension(info: MaskInfo) -> nib.nifti1.Nifti1Extension:
    """The header extension that carries ``info`` in a NIfTI file."""
    text = json.dumps({EXTENSION_KEY: info.to_json()}, separators=(",", ":"))
    return nib.nifti1.Nifti1Extension(EXTENSION_CODE, text.encode("utf-8"))


def read_mask_info(path: str | Path) -> MaskInfo | None:
    """The :class:`MaskInfo` a NIfTI file carries, or None (no extension of ours, or not NIfTI).

    Reads the header only. An extension of ours that cannot be parsed is
    logged and ignored: the voxels are still a valid mask.
    """
    header = _nifti_header(path)
    return None if header is None else _info_in(header, path)


def looks_like_mask(volume: Volume, path: str | Path | None = None) -> bool:
    """Is this a label map (open it as labels) rather than a scan?

    Yes when the file says so (our extension, or NIfTI intent "label", which
    our masks and some other tools write), or when the voxels are
    non-negative integers with at most :data:`MAX_MASK_VALUES` distinct
    values in a sample of slices: masks saved by ITK-SNAP or 3D Slicer
    declare nothing, and no scan has so few grey levels.
    """
    array = volume.array
    header = _nifti_header(path) if path is not None else None
    if header is not None and (
        int(header["intent_code"]) == NIFTI_INTENT_LABEL or _info_in(header, path) is not None
    ):
        # Declared labels, stored as integers or as whole floats (scaled NIfTI).
        if array.dtype.kind in "iu":
            return True
        sample = array[:: max(1, array.shape[0] // 16)]
        return bool(np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)))
    if array.dtype.kind not in "iu" or array.size == 0:
        return False
    middle = array[array.shape[0] // 2]
    if middle.min() < 0 or np.unique(middle).size > MAX_MASK_VALUES:
        return False  # most scans are told apart here, from one slice
    sample = array[:: max(1, array.shape[0] // 16)]
    return bool(sample.min() >= 0) and np.unique(sample).size <= MAX_MASK_VALUES


def _nifti_header(path: str | Path) -> nib.nifti1.Nifti1Header | None:
    """The header of a NIfTI-1/2 file (voxels are not read), or None."""
    path = Path(path)
    if not is_nifti_path(path) or not path.is_file():
        return None
    try:
        img = nib.load(str(path))
    except Exception:  # unreadable files are load_volume's to report
        return None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return None
    return img.header


def _info_in(header: nib.nifti1.Nifti1Header, path: str | Path | None) -> MaskInfo | None:
    for ext in header.extensions:
        if ext.get_code() != EXTENSION_CODE:
            continue
        try:
            payload = json.loads(bytes(ext.get_content()).rstrip(b"\x00").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # someone else's comment
        if not isinstance(payload, dict) or EXTENSION_KEY not in payload:
            continue
        try:
            return MaskInfo.from_json(payload[EXTENSION_KEY])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("%s: ignoring its damaged napari-fewlabel extension (%s)", path, exc)
            return None
    return None
