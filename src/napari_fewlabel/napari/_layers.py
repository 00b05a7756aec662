"""Between `Volume` and napari layers: one place for scale, translate and metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import METADATA_KEY, MaskInfo, Volume, smallest_label_dtype

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

    from napari_fewlabel.jobs import SegmentationReady

#: layer.metadata key holding the classes of an annotation layer made by the plugin.
CLASSES_KEY = "fewlabel_classes"
#: layer.metadata key marking a prediction layer made by the plugin.
PREDICTION_KEY = "fewlabel_prediction"
#: layer.metadata key of an annotation layer's slices marked empty:
#: ``{"axis": int, "slices": [int, ...]}`` (indices along that data axis).
EMPTY_SLICES_KEY = "fewlabel_empty_slices"
#: Metadata key marking the live preview layer (never an annotation, never listed).
PREVIEW_KEY = "fewlabel_preview"

#: Soft-tissue window (W400/L40) for CT; MR uses its 0.5-99.5 percentiles.
CT_WINDOW = (-160.0, 240.0)


def geometry_kwargs(volume: Volume) -> dict[str, Any]:
    """``scale``, ``translate`` and ``metadata`` that place a layer on ``volume``."""
    return {
        "scale": volume.napari_scale(),
        "translate": volume.napari_translate(),
        "metadata": {METADATA_KEY: volume.to_metadata()},
        "axis_labels": ("S", "P", "L"),
        "units": "mm",
    }


def image_layer_data(volume: Volume, name: str) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari LayerDataTuple for a scan."""
    kwargs = geometry_kwargs(volume)
    kwargs.update(name=name, colormap="gray", contrast_limits=display_window(volume))
    return (volume.array, kwargs, "image")


def labels_layer_data(
    labels: np.ndarray,
    like: Volume,
    name: str,
    classes: Sequence[SegmentationClass] = (),
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari LayerDataTuple for a mask drawn on ``like``.

    ``classes`` (background first) give the colours, and are kept in the
    metadata so that saving the layer writes their names into the file.
    """
    kwargs = geometry_kwargs(like.with_array(labels))
    kwargs["name"] = name
    if classes:
        kwargs["colormap"] = _label_colormap(
            {c.index: np.array(c.color) / 255 for c in classes[1:]}
        )
        kwargs["metadata"][CLASSES_KEY] = [c.to_dict() for c in classes]
    return (labels, kwargs, "labels")


def mask_layer_data(
    mask: Volume, name: str, info: MaskInfo | None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A LayerDataTuple for a mask file: a Labels layer with its classes and marks restored."""
    info = info or MaskInfo()
    classes = tuple(SegmentationClass.from_dict(c) for c in info.classes)
    array = mask.array
    if array.dtype.kind == "f":  # whole numbers stored as float (a scaled NIfTI)
        array = array.astype(smallest_label_dtype(int(np.nanmax(array, initial=0))))
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # napari wants native order
    data, kwargs, kind = labels_layer_data(array, mask, name, classes)
    kwargs["metadata"].update(mask_metadata(info))
    return data, kwargs, kind


def mask_metadata(info: MaskInfo) -> dict[str, Any]:
    """The layer.metadata entries that hold ``info`` (what :func:`mask_info_of` reads)."""
    out: dict[str, Any] = {}
    if info.classes:
        out[CLASSES_KEY] = [dict(c) for c in info.classes]
    if info.empty_slices:
        out[EMPTY_SLICES_KEY] = {"axis": info.empty_axis, "slices": list(info.empty_slices)}
    return out


def mask_info_of(metadata: Mapping[str, Any]) -> MaskInfo:
    """Classes and empty-slice marks a Labels layer's metadata holds, to save with the mask."""
    marks = metadata.get(EMPTY_SLICES_KEY) or {}
    return MaskInfo(
        classes=tuple(metadata.get(CLASSES_KEY) or ()),
        empty_axis=int(marks.get("axis", 0)),
        empty_slices=tuple(int(i) for i in marks.get("slices", ())),
    )


def show_prediction(
    viewer: napari.viewer.Viewer, name: str, like: Volume, event: SegmentationReady
) -> Labels:
    """Show a whole-volume prediction as the Labels layer ``name`` on ``like``'s grid.

    An existing layer of that name and shape is updated through napari's undoable
    edit path (Ctrl+Z brings the previous prediction back); otherwise a new layer
    is added, marked as a prediction so it never becomes the annotation.
    """
    from napari.layers import Labels

    existing = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 (no get)
    if isinstance(existing, Labels) and existing.data.shape == event.labels.shape:
        changed = np.nonzero(np.asarray(existing.data) != event.labels)
        existing.data_setitem(changed, event.labels[changed])
        return existing
    data, kwargs, _ = labels_layer_data(event.labels, like, name, event.classes)
    kwargs["metadata"][PREDICTION_KEY] = True
    kwargs["opacity"] = 0.5
    return viewer.add_labels(data, **kwargs)


def slice_on_screen(viewer: napari.viewer.Viewer, layer: Any) -> tuple[int, int] | None:
    """``(data axis, index)`` of ``layer``'s slice in the 2D view; None in 3D or outside it."""
    dims = viewer.dims
    if layer.ndim != 3 or dims.ndisplay != 2 or len(dims.not_displayed) != dims.ndim - 2:
        return None
    axis = dims.not_displayed[-1] - (dims.ndim - layer.ndim)
    index = int(np.round(layer.world_to_data(dims.point)[axis]))
    return (axis, index) if 0 <= index < layer.data.shape[axis] else None


def layer_meta(layer: Any) -> dict[str, Any]:
    """What :func:`volume_from_layer` reads from a layer besides its data."""
    return {
        "metadata": layer.metadata,
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": np.asarray(layer.affine.affine_matrix),
    }


def display_window(volume: Volume) -> tuple[float, float]:
    if volume.modality == "CT":
        return CT_WINDOW
    sample = volume.array[:: max(1, volume.shape[0] // 32)]
    lo, hi = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def volume_from_layer(data: np.ndarray, meta: Mapping[str, Any], *, what: str = "layer") -> Volume:
    """The scan geometry a layer carries (from our reader or widget).

    A layer without our metadata (e.g. napari's own "New labels layer" on an
    image that another reader opened) falls back to its ``scale``/``translate``
    read as axis-aligned LPS millimetres -- what our reader sets -- as long as
    it is not rotated, sheared or affine-transformed.
    """
    metadata = meta.get("metadata") or {}
    if METADATA_KEY in metadata:
        return Volume.from_metadata(np.asarray(data), metadata)
    for key in ("rotate", "shear"):
        value = meta.get(key)
        if value is not None and not np.allclose(
            np.asarray(value, dtype=float), _identity_like(key, value)
        ):
            raise FewLabelError(
                f"This {what} is {key}d and carries no scan geometry: create it with the "
                "FewLabel widget's 'New annotation layer' on an image opened by this plugin."
            )
    affine = meta.get("affine")
    if affine is not None and not np.allclose(
        np.asarray(affine, dtype=float), np.eye(np.asarray(affine).shape[0])
    ):
        raise FewLabelError(
            f"This {what} has an affine transform and carries no scan geometry: create it "
            "with the FewLabel widget's 'New annotation layer' on an image opened by this plugin."
        )
    array = np.asarray(data)
    if array.ndim != 3:
        raise FewLabelError(f"A 3D {what} is needed, this one has shape {array.shape}.")
    scale = tuple(float(s) for s in meta.get("scale", (1.0, 1.0, 1.0)))
    translate = tuple(float(t) for t in meta.get("translate", (0.0, 0.0, 0.0)))
    return Volume.from_array(
        array,
        (scale[0], scale[1], scale[2]),
        origin_lps_mm=(translate[2], translate[1], translate[0]),
        header={"format": "napari layer (no source file geometry)"},
    )


def _identity_like(key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if key == "rotate":
        return np.eye(arr.shape[0]) if arr.ndim == 2 else np.zeros_like(arr)
    return np.zeros_like(arr)


def _label_colormap(colors: Mapping[int, Any]) -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    mapping: dict[int | None, Any] = {0: "transparent", None: "magenta"}
    mapping.update({int(k): v for k, v in colors.items()})
    return DirectLabelColormap(color_dict=mapping)
