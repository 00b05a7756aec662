"""Which slice to label next: where the model's two streams disagree most.

The fine-tuned network has two decoders that were trained to agree on
unlabelled slices (cross pseudo-supervision). Where they still label a voxel
differently, the model is unsure, and a label there settles the most. Each
slice along the model's slice axis gets a score: the number of its voxels
whose label differs between the two streams. Slices already labelled (painted
or marked empty) are left out; the rest are ranked by score, highest first.

Cheap by design: one pass over the volume along one plane, the two streams'
argmax compared batch by batch; nothing of the volume's size is kept beyond
the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from napari_fewlabel.data.input_fit import InputFit
from napari_fewlabel.data.normalization import fit_intensity
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import SegmentationModel
from napari_fewlabel.train.device import autocast, place_network, precision_for, resolve_device


@dataclass(frozen=True)
class SliceScore:
    """One candidate slice.

    Attributes
    ----------
    index : int
        The slice's index along ``axis`` (as napari numbers it: display order).
    axis : int
        The slice axis of the display array ``(z, y, x)``.
    disagreement : int
        Voxels of the slice that the two streams label differently.
    foreground : int
        Voxels of the slice that either stream labels as a structure.
    """

    index: int
    axis: int
    disagreement: int
    foreground: int

    def to_dict(self) -> dict[str, int]:
        return {
            "index": self.index,
            "axis": self.axis,
            "disagreement": self.disagreement,
            "foreground": self.foreground,
        }


def stream_disagreement(
    model: SegmentationModel,
    volume: Volume,
    *,
    axis: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: voxels the two streams label differently, and voxels either calls a structure.

    Returns
    -------
    disagreement, foreground : ndarray of int64, shape (slices along ``axis``,)
    """
    card = model.card
    axis = card.slice_axis if axis is None else axis
    if axis not in (0, 1, 2):
        raise FewLabelError(f"Slice axis must be 0, 1 or 2, got {axis}.")
    array = volume.array
    mapping = fit_intensity(array, card.normalization)
    network = model.network
    dev = resolve_device(device)
    network = place_network(network, dev).eval()
    batch_size = batch_size or (2 if dev.type == "cpu" else 16)
    precision = precision_for(dev)
    half = network.config.in_slices // 2
    slice_shape = tuple(s for a, s in enumerate(array.shape) if a != axis)
    fit = InputFit((slice_shape[0], slice_shape[1]), card.input_size)
    n = array.shape[axis]
    disagreement = np.zeros(n, dtype=np.int64)
    foreground = np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        window = np.arange(start - half, stop + half).clip(0, n - 1)
        block = mapping(np.moveaxis(np.take(array, window, axis=axis), axis, 0))
        stacked = torch.from_numpy(block).unfold(0, 2 * half + 1, 1).permute(0, 3, 1, 2)
        x = fit.images_to_input(stacked.contiguous(), mapping.background)
        with torch.no_grad(), autocast(dev, precision):
            logits_a, logits_b = network(x.to(dev))
        labels_a = fit.probabilities_from_input(logits_a.float().softmax(1)).argmax(1)
        labels_b = fit.probabilities_from_input(logits_b.float().softmax(1)).argmax(1)
        disagreement[start:stop] = (labels_a != labels_b).flatten(1).sum(1).cpu().numpy()
        foreground[start:stop] = ((labels_a > 0) | (labels_b > 0)).flatten(1).sum(1).cpu().numpy()
    return disagreement, foreground


def suggest_slices(
    model: SegmentationModel,
    volume: Volume,
    *,
    n: int = 5,
    exclude: Iterable[int] = (),
    axis: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
) -> list[SliceScore]:
    """The ``n`` unlabelled slices where the two streams disagree most, highest first.

    Parameters
    ----------
    model : SegmentationModel
        A fine-tuned two-stream model (:func:`~napari_fewlabel.models.checkpoint.load_checkpoint`).
    volume : Volume
        The scan, ``(z, y, x)``.
    n : int
        How many slices to return (fewer when fewer are left).
    exclude : iterable of int
        Slices along ``axis`` not to suggest: the labelled and marked-empty ones.
    axis : int, optional
        Slice axis; default: the one the model was trained along.

    Raises
    ------
    FewLabelError
        When ``n`` < 1 or an excluded index is outside the scan.
    """
    if n < 1:
        raise FewLabelError(f"Ask for at least one slice (n = {n}).")
    axis = model.card.slice_axis if axis is None else axis
    disagreement, foreground = stream_disagreement(
        model, volume, axis=axis, batch_size=batch_size, device=device
    )
    count = disagreement.size
    excluded = {int(i) for i in exclude}
    outside = sorted(i for i in excluded if not 0 <= i < count)
    if outside:
        raise FewLabelError(
            f"Slice(s) {', '.join(map(str, outside))} are outside the scan, which has {count} "
            f"slices along axis {axis}: give the labelled slices of this scan."
        )
    candidates = [i for i in range(count) if i not in excluded]
    # Highest disagreement first; ties (often 0) go to the slice with more structure.
    candidates.sort(key=lambda i: (-int(disagreement[i]), -int(foreground[i]), i))
    return [SliceScore(i, axis, int(disagreement[i]), int(foreground[i])) for i in candidates[:n]]
