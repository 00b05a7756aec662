"""npe2 writers: Labels -> NIfTI mask on the scan's voxel grid; Image -> NIfTI."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_fewlabel.io import save_image, save_labels
from napari_fewlabel.napari._layers import mask_info_of, volume_from_layer


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer as a NIfTI mask that lines up with its scan.

    The layer's classes and slices marked empty travel in the file, so
    opening it again gives the same annotation back.

    Raises FewLabelError (shown by napari as a notification) on a shape
    mismatch or an unwritable path; nothing is left half-written.
    """
    labels = np.asarray(data)
    like = volume_from_layer(labels, meta, what="labels layer")
    info = mask_info_of(meta.get("metadata") or {})
    return [str(save_labels(labels, like=like, path=path, info=info))]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write an Image layer as NIfTI on its source file grid."""
    volume = volume_from_layer(np.asarray(data), meta, what="image layer")
    return [str(save_image(volume, path))]
