"""`Volume`: a 3D scan with the geometry needed to put a mask back on it.

Conventions (one place for them)
--------------------------------
* ``Volume.array`` is indexed ``(z, y, x)`` in the *display orientation*: the
  voxel grid of the file, flipped and transposed (never resampled) so that
  axis 0 points toward the patient's **S**\\ uperior, axis 1 toward
  **P**\\ osterior and axis 2 toward the patient's **L**\\ eft -- DICOM's
  LPS order, axes reversed. An axial slice ``array[z]`` shown by napari (rows
  down, columns right) then has anterior at the top and the patient's right on
  the left of the screen: the radiological convention. For oblique scans the
  nearest such orientation is used and the rotation stays in the affine.
* ``Volume.affine`` maps a homogeneous index ``(z, y, x, 1)`` of ``array`` to
  scanner world coordinates in mm, **RAS+** as nibabel and NIfTI report them.
  (ITK and DICOM use LPS+: the first two world rows change sign.)
* ``Volume.grid`` remembers the file's own voxel grid and header affines, so
  an exported mask is written in the file's voxel order with the file's
  qform/sform: voxel ``(i, j, k)`` of the mask is voxel ``(i, j, k)`` of the
  scan, and any viewer puts it on top of the scan.

Nothing here imports torch or Qt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from nibabel import orientations as nio

from napari_fewlabel.errors import FewLabelError

Modality = Literal["CT", "MR", "unknown"]
MODALITIES: tuple[Modality, ...] = ("CT", "MR", "unknown")

#: nibabel axis codes of the display orientation: the direction each array
#: axis ``(z, y, x)`` points toward.
DISPLAY_AXCODES = ("S", "P", "L")
_DISPLAY_ORNT = nio.axcodes2ornt(DISPLAY_AXCODES)

#: key under which the geometry is kept in a napari layer's ``metadata``.
METADATA_KEY = "fewlabel"
_METADATA_VERSION = 1

# Flip the first two rows of an affine to go between RAS+ (NIfTI) and LPS+ (ITK, DICOM).
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class FileGrid:
    """The voxel grid of the source file and how the display array maps onto it.

    Attributes
    ----------
    shape : tuple of int
        Shape of the data array in the file, ``(i, j, k)`` (nibabel order).
    affine : ndarray, shape (4, 4)
        ``(i, j, k, 1)`` -> RAS+ mm, as nibabel reports it for the file.
    to_display : ndarray, shape (3, 2)
        nibabel orientation transform from the file grid to the display array.
    qform, sform : ndarray (4, 4) or None
        The NIfTI header affines to write on export (copied from a NIfTI
        source; both equal to ``affine`` for other formats).
    qform_code, sform_code : int
        NIfTI xform codes to write with them (1 = scanner anatomical).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    to_display: np.ndarray
    qform: np.ndarray | None = None
    sform: np.ndarray | None = None
    qform_code: int = 1
    sform_code: int = 1

    def display_shape(self) -> tuple[int, int, int]:
        order = self.to_display[:, 0].astype(int)
        out = [0, 0, 0]
        for file_axis, display_axis in enumerate(order):
            out[display_axis] = self.shape[file_axis]
        return (out[0], out[1], out[2])

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "to_display": self.to_display.tolist(),
            "qform": None if self.qform is None else self.qform.tolist(),
            "sform": None if self.sform is None else self.sform.tolist(),
            "qform_code": int(self.qform_code),
            "sform_code": int(self.sform_code),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileGrid:
        def arr(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64)

        shape = tuple(int(s) for s in d["shape"])
        return cls(
            shape=(shape[0], shape[1], shape[2]),
            affine=np.asarray(d["affine"], dtype=np.float64),
            to_display=np.asarray(d["to_display"], dtype=np.float64),
            qform=arr(d.get("qform")),
            sform=arr(d.get("sform")),
            qform_code=int(d.get("qform_code", 1)),
            sform_code=int(d.get("sform_code", 1)),
        )


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan in display orientation with its world geometry.

    Attributes
    ----------
    array : ndarray, shape (z, y, x)
        Voxel values (HU for CT) in display orientation (see module docstring).
    spacing_mm : tuple of float
        Voxel size along ``(z, y, x)`` in mm.
    affine : ndarray, shape (4, 4)
        ``(z, y, x, 1)`` index -> RAS+ world mm.
    modality : {"CT", "MR", "unknown"}
    header : mapping
        JSON-able summary of the source header (format, path, selected DICOM
        tags, other series found next to this one, ...).
    grid : FileGrid
        The source file's voxel grid, used to write masks back onto it.
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    modality: Modality
    grid: FileGrid
    header: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise FewLabelError(
                f"Expected a 3D volume, got an array of shape {self.array.shape}: "
                "open a single 3D scan (one series, one time point)."
            )
        if tuple(self.array.shape) != self.grid.display_shape():
            raise FewLabelError(
                f"Array shape {self.array.shape} does not match the geometry's shape "
                f"{self.grid.display_shape()}: pass an array of the scan's shape."
            )
        if self.modality not in MODALITIES:
            raise FewLabelError(f"Unknown modality {self.modality!r}: use one of {MODALITIES}.")

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (s[0], s[1], s[2])

    def with_array(self, array: np.ndarray, *, modality: Modality | None = None) -> Volume:
        """The same geometry with other voxels (a mask, a prediction, a normalised copy)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise FewLabelError(
                f"Shape {array.shape} differs from the scan's shape {self.array.shape}: "
                "the labels must be drawn on this scan (same size along every axis)."
            )
        return Volume(
            array=array,
            spacing_mm=self.spacing_mm,
            affine=self.affine,
            modality=self.modality if modality is None else modality,
            grid=self.grid,
            header=self.header,
        )

    def to_file_grid(self, array: np.ndarray) -> np.ndarray:
        """Reorder a display-orientation array ``(z, y, x)`` into the file's ``(i, j, k)``."""
        if array.shape != self.array.shape:
            raise FewLabelError(
                f"Shape {array.shape} differs from the scan's shape {self.array.shape}: "
                "export a layer drawn on this scan."
            )
        back = nio.ornt_transform(_DISPLAY_ORNT, _file_ornt(self.grid.to_display))
        return nio.apply_orientation(array, back)

    # ------------------------------------------------------------- for napari
    def napari_scale(self) -> tuple[float, float, float]:
        return self.spacing_mm

    def napari_translate(self) -> tuple[float, float, float]:
        """World position of voxel (0, 0, 0) in mm along (S, P, L).

        For an axis-aligned scan napari's world coordinates are then scanner
        LPS coordinates (in z, y, x order); for an oblique scan they are the
        nearest axis-aligned approximation (the exact affine is in metadata).
        """
        r, a, s = (float(v) for v in self.affine[:3, 3])
        return (s, -a, -r)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able geometry for ``layer.metadata[METADATA_KEY]``."""
        return {
            "version": _METADATA_VERSION,
            "spacing_mm": list(self.spacing_mm),
            "affine": self.affine.tolist(),
            "modality": self.modality,
            "grid": self.grid.to_dict(),
            "header": dict(self.header),
        }

    @classmethod
    def from_metadata(cls, array: np.ndarray, metadata: Mapping[str, Any]) -> Volume:
        """Rebuild a Volume from a layer's data and ``layer.metadata``.

        ``metadata`` may be the layer's whole metadata dict or its
        ``METADATA_KEY`` entry. Raises FewLabelError when the layer carries no
        geometry from this plugin.
        """
        meta = metadata.get(METADATA_KEY, metadata)
        if not isinstance(meta, Mapping) or "grid" not in meta:
            raise FewLabelError(
                "This layer has no scan geometry attached: open the scan with the "
                "napari-fewlabel reader (or create the labels layer from the plugin's "
                "widget) so the mask can be placed in world coordinates."
            )
        return cls(
            array=np.asarray(array),
            spacing_mm=_triple(meta["spacing_mm"]),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            modality=meta.get("modality", "unknown"),
            grid=FileGrid.from_dict(meta["grid"]),
            header=dict(meta.get("header", {})),
        )

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_file_array(
        cls,
        file_array: np.ndarray,
        affine: np.ndarray,
        *,
        modality: Modality,
        header: Mapping[str, Any] | None = None,
        qform: tuple[np.ndarray | None, int] | None = None,
        sform: tuple[np.ndarray | None, int] | None = None,
    ) -> Volume:
        """Build a display-orientation Volume from a file's ``(i, j, k)`` array.

        Parameters
        ----------
        file_array : ndarray, shape (i, j, k)
            Data in the file's voxel order (nibabel's ``get_fdata`` order).
        affine : ndarray (4, 4)
            ``(i, j, k, 1)`` -> RAS+ mm.
        qform, sform : (affine or None, code), optional
            NIfTI header transforms to copy on export; default: ``affine``
            with code 1 (scanner anatomical).
        """
        affine = np.asarray(affine, dtype=np.float64)
        if file_array.ndim != 3:
            raise FewLabelError(
                f"Expected a 3D volume, got {file_array.ndim} dimensions "
                f"(shape {file_array.shape}): open a single 3D scan, or split a "
                "4D series into 3D volumes first."
            )
        to_display, display_affine = display_transform(file_array.shape, affine)
        array = nio.apply_orientation(file_array, to_display)
        q_aff, q_code = qform if qform is not None else (affine, 1)
        s_aff, s_code = sform if sform is not None else (affine, 1)
        grid = FileGrid(
            shape=(file_array.shape[0], file_array.shape[1], file_array.shape[2]),
            affine=affine,
            to_display=to_display,
            qform=None if q_aff is None else np.asarray(q_aff, dtype=np.float64),
            sform=None if s_aff is None else np.asarray(s_aff, dtype=np.float64),
            qform_code=int(q_code),
            sform_code=int(s_code),
        )
        return cls(
            array=array,
            spacing_mm=spacing_from_affine(display_affine),
            affine=display_affine,
            modality=modality,
            grid=grid,
            header=dict(header or {}),
        )

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
        *,
        modality: Modality = "unknown",
        origin_lps_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
        header: Mapping[str, Any] | None = None,
    ) -> Volume:
        """A Volume for an array already in display orientation ``(z, y, x)``.

        Used for synthetic phantoms and arrays made in memory: axis 2 is taken
        to point toward L, axis 1 toward P, axis 0 toward S (LPS), starting at
        ``origin_lps_mm`` (x, y, z in LPS). Exported files store the array as
        ``(x, y, z)`` with the matching affine.
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise FewLabelError(
                f"Expected a 3D array (z, y, x), got shape {array.shape}: "
                "stack 2D slices into a volume first."
            )
        sz, sy, sx = (float(s) for s in spacing_mm)
        if min(sz, sy, sx) <= 0:
            raise FewLabelError(f"Voxel spacing must be positive, got {spacing_mm} mm.")
        lps = np.array([[sx, 0, 0, origin_lps_mm[0]],
                        [0, sy, 0, origin_lps_mm[1]],
                        [0, 0, sz, origin_lps_mm[2]],
                        [0, 0, 0, 1.0]])  # fmt: skip
        file_affine = RAS_FROM_LPS @ lps
        return cls.from_file_array(
            array.transpose(2, 1, 0), file_affine, modality=modality, header=header
        )


def display_transform(
    file_shape: tuple[int, ...], affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """How a file grid of ``file_shape`` (i, j, k) with ``affine`` maps onto the display.

    Returns the nibabel orientation transform from the file grid to the display
    array and the display affine (``(z, y, x, 1)`` -> RAS+ mm). Needs only the
    header, so ``fewlabel info`` can report the geometry without the voxels.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise FewLabelError(
            "The file's voxel-to-world transform is missing or not finite: "
            "fix the header (spacing, origin, direction) in the scanner export."
        )
    columns = affine[:3, :3] / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-300)
    if abs(np.linalg.det(columns)) < 1e-6 or np.linalg.norm(affine[:3, :3], axis=0).min() < 1e-6:
        raise FewLabelError(
            "The file's voxel-to-world transform is singular (a zero voxel size, or two "
            "axes pointing the same way): fix the spacing and direction in the file header."
        )
    file_ornt = nio.io_orientation(affine)
    if np.isnan(file_ornt).any():
        raise FewLabelError(
            "The file's voxel axes do not map onto distinct world axes: fix the "
            "direction (orientation) in the file header."
        )
    to_display = nio.ornt_transform(file_ornt, _DISPLAY_ORNT)
    return to_display, affine @ nio.inv_ornt_aff(to_display, tuple(file_shape))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each axis of an index -> world affine."""
    return _triple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _file_ornt(to_display: np.ndarray) -> np.ndarray:
    """The file grid's own orientation, given its transform to the display."""
    # to_display = ornt_transform(file_ornt, display_ornt); invert it.
    file_ornt = np.zeros((3, 2))
    for file_axis, (display_axis, flip) in enumerate(to_display):
        d_axis, d_flip = _DISPLAY_ORNT[int(display_axis)]
        file_ornt[file_axis] = (d_axis, d_flip * flip)
    return file_ornt


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    if len(v) != 3:
        raise FewLabelError(f"Expected three spacing values (z, y, x), got {v}.")
    return (v[0], v[1], v[2])


def parse_modality(text: str | None) -> Modality | None:
    """ "CT" or "MR" from a header value (DICOM Modality, NRRD key), else None."""
    value = (text or "").strip().upper()
    if value == "CT":
        return "CT"
    if value in ("MR", "MRI"):
        return "MR"
    return None


def guess_modality(array: np.ndarray) -> Modality:
    """Guess CT vs MR from intensities when the header does not say.

    CT in Hounsfield units has air at about -1000 HU around the patient and in
    the lungs, and rarely exceeds a few thousand HU; MR intensities are
    arbitrary but almost never contain a block of values near -1000.
    """
    if array.size == 0:
        return "unknown"
    # A strided subsample (about 256k voxels): ravel() of a reoriented view would copy it all.
    step = max(1, int(np.ceil((array.size / 262_144) ** (1 / 3))))
    sample = np.asarray(array)[::step, ::step, ::step].ravel()
    air = np.count_nonzero((sample >= -1100) & (sample <= -900)) / sample.size
    return "CT" if air >= 0.005 and float(np.percentile(sample, 99.9)) <= 4000 else "MR"
