"""Whole-volume prediction, slice batch by slice batch, with bounded memory.

The volume is never copied whole: each batch takes its slices (plus the
adjacent ones for 2.5D input) from the original array, normalises them with
statistics fitted once per volume, runs the network (mean of the two streams'
softmax), maps the probabilities back to the slice's own size and writes the
argmax into the output label array. Peak memory is the input, the output
labels (1 byte per voxel for up to 256 classes) and one batch: predicting a
512x512x600 int16 CT along one plane on the CPU needs about 1.9x the scan's
size over the process's baseline. A model that predicts along three planes
also keeps their running sum, one byte per class and voxel: 3.7x for a
4-class model on that CT (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch

from napari_fewlabel.data.input_fit import InputFit
from napari_fewlabel.data.normalization import IntensityMapping, count_nonfinite, fit_intensity
from napari_fewlabel.data.planes import MIN_SLICES_FOR_CROSS_PLANES, plane_fit
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import SegmentationModel
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.device import autocast, place_network, precision_for, resolve_device
from napari_fewlabel.train.events import CancelFlag

logger = logging.getLogger(__name__)


class PredictionStopped(Exception):
    """The ``cancel`` flag given to :func:`predict_volume` was set: no labels were made."""


def predict_volume(
    model: SegmentationModel,
    volume: Volume,
    *,
    axis: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    test_time_flips: bool | None = None,
    cancel: CancelFlag | None = None,
) -> np.ndarray:
    """Segment every slice of ``volume``.

    Parameters
    ----------
    model : SegmentationModel
        Network and model card (:func:`~napari_fewlabel.models.checkpoint.load_checkpoint`).
    volume : Volume
        The scan, ``(z, y, x)``.
    axis : int, optional
        Slice axis; default: the axis the model was trained along (its card).
        A model whose card lists several ``inference.planes`` is also run
        along the other axes, and the planes' probabilities are averaged,
        weighted by ``inference.plane_weights`` (a scan with fewer than 8
        slices along ``axis`` uses that axis alone).
    batch_size : int, optional
        Slices per forward pass; default 16 on a GPU and 2 on the CPU, where
        the network's activations (about 40 MB per 256x256 slice) share the
        host memory with the scan (4 were no faster and took 0.25x the
        volume more memory on a 512x512x600 CT; docs/benchmarks.md). Halved
        automatically when a GPU runs out of memory.
    device : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then CPU.
    test_time_flips : bool, optional
        Also predict left-right and up-down flipped copies and average the
        probabilities; default: the model card's choice.
    cancel : CancelFlag, optional
        Checked before every batch of slices; once set, the prediction ends
        there by raising :class:`PredictionStopped` (a batch takes well under
        a second on the CPU).

    Returns
    -------
    ndarray, shape (z, y, x)
        Labels (``uint8``, or ``uint16`` beyond 256 classes) in the volume's geometry.

    Notes
    -----
    NaN/Inf voxels are treated as the lowest intensity (logged as a warning).
    """
    steps = predict_volume_steps(
        model,
        volume,
        axis=axis,
        batch_size=batch_size,
        device=device,
        test_time_flips=test_time_flips,
        cancel=cancel,
    )
    return run_to_end(steps)


def run_to_end(
    steps: Generator[tuple[int, int], None, np.ndarray],
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The labels :func:`predict_volume_steps` returns; ``on_step(done, total)`` after each batch."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            labels: np.ndarray = finished.value
            return labels
        if on_step is not None:
            on_step(done, total)


def predict_volume_steps(
    model: SegmentationModel,
    volume: Volume,
    *,
    axis: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    test_time_flips: bool | None = None,
    cancel: CancelFlag | None = None,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """:func:`predict_volume`, yielding ``(slices done, slices in all)`` after every batch.

    The count runs over every plane the model predicts along; the labels are
    the generator's return value (``StopIteration.value``).
    """
    card = model.card
    axis = card.slice_axis if axis is None else axis
    if axis not in (0, 1, 2):
        raise FewLabelError(f"Slice axis must be 0, 1 or 2, got {axis}.")
    if batch_size is not None and batch_size < 1:
        raise FewLabelError(f"batch_size must be at least 1, got {batch_size}.")
    if test_time_flips is None:
        test_time_flips = bool(card.inference.get("test_time_flips", False))
    if volume.modality != card.modality and "unknown" not in (volume.modality, card.modality):
        logger.warning(
            "The model was trained on %s but the scan is %s: expect poor results unless "
            "the model was adapted to %s.",
            card.modality,
            volume.modality,
            volume.modality,
        )
    array = volume.array
    bad = count_nonfinite(array)
    if bad == array.size:
        raise FewLabelError("Every voxel of the image is NaN or Inf: check the file.")
    if bad:
        logger.warning("%d NaN/Inf voxels are treated as the lowest intensity.", bad)

    mapping = fit_intensity(array, card.normalization)
    num_classes = len(card.classes)
    out = np.zeros(array.shape, dtype=np.uint8 if num_classes <= 256 else np.uint16)
    slice_shape = tuple(s for a, s in enumerate(array.shape) if a != axis)
    main_fit = InputFit((slice_shape[0], slice_shape[1]), card.input_size)
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = 2 if dev.type == "cpu" else 16
    run = _PlaneRun(
        place_network(model.network, dev).eval(),
        array,
        mapping,
        dev,
        batch_size,
        test_time_flips,
        cancel,
    )
    planes = [int(p) for p in card.inference.get("planes", [axis])]
    if array.shape[axis] < MIN_SLICES_FOR_CROSS_PLANES:
        planes = [axis]  # as training does: slices across a thin scan are a few rows tall
    if len(planes) <= 1:
        out_moved = np.moveaxis(out, axis, 0)  # a view: writing it fills ``out``
        for start, stop, proba in run.along(axis, main_fit):
            out_moved[start:stop] = proba.argmax(dim=1).numpy().astype(out.dtype)
            yield stop, array.shape[axis]
        return out

    # Several planes: a weighted mean of their probabilities, kept as bytes (plane p
    # adds at most its share of 255), so the sum costs one byte per class and voxel.
    shares = _plane_shares(planes, card.inference.get("plane_weights"))
    total = np.zeros((num_classes, *array.shape), dtype=np.uint8)
    to_do = sum(array.shape[p] for p, share in shares.items() if share > 0)
    done = 0
    max_side = int(card.inference.get("plane_max_side", max(card.input_size)))
    divisor = model.network.config.size_divisor
    for plane, share in shares.items():
        if share == 0:
            continue
        fit = plane_fit(array.shape, volume.spacing_mm, axis, plane, main_fit, divisor, max_side)
        total_moved = np.moveaxis(total, plane + 1, 1)  # (K, slices along plane, ...)
        for start, stop, proba in run.along(plane, fit):
            quantised = (proba * share).floor().to(torch.uint8).numpy()
            total_moved[:, start:stop] += quantised.transpose(1, 0, 2, 3)
            done += stop - start
            yield done, to_do
    for z in range(array.shape[0]):  # argmax slice by slice: no K x volume int64 index
        out[z] = total[:, z].argmax(axis=0)
    return out


def _plane_shares(planes: list[int], weights: list[float] | None) -> dict[int, int]:
    """Each plane's share of 255 in the byte sum: by the card's ``plane_weights``, else equal.

    The weights say how well each plane fits the labels it was trained on
    (``train.finetune_scores.plane_reliability``): a plane that has not learnt
    the structures gets little say. No positive weight: equal shares.
    """
    if weights is None or len(weights) != len(planes) or sum(max(0.0, w) for w in weights) <= 0:
        weights = [1.0] * len(planes)
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    w = w / w.sum()
    return {int(p): int(255 * share) for p, share in zip(planes, w, strict=True)}


class _PlaneRun:
    """Probabilities of every slice along one plane, batch by batch, halving batches on GPU OOM."""

    def __init__(
        self,
        network: TwoStreamUNet,
        array: np.ndarray,
        mapping: IntensityMapping,
        device: torch.device,
        batch_size: int,
        flips: bool,
        cancel: CancelFlag | None = None,
    ) -> None:
        self.network = network
        self.array = array
        self.mapping = mapping
        self.device = device
        self.batch_size = batch_size
        self.flips = flips
        self.cancel = cancel
        self.precision = precision_for(device)
        self.half = network.config.in_slices // 2

    def along(self, axis: int, fit: InputFit) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, probabilities (B, K, h, w) on the CPU)`` for consecutive slices."""
        n, half, array = self.array.shape[axis], self.half, self.array
        start = 0
        while start < n:
            if self.cancel is not None and self.cancel.is_set():
                raise PredictionStopped
            stop = min(n, start + self.batch_size)
            try:
                with torch.no_grad():
                    window = np.arange(start - half, stop + half).clip(0, n - 1)
                    block = self.mapping(np.moveaxis(np.take(array, window, axis=axis), axis, 0))
                    # (slices + 2 * half, h, w) -> windows (B, in_slices, h, w)
                    stacked = torch.from_numpy(block).unfold(0, 2 * half + 1, 1).permute(0, 3, 1, 2)
                    x = fit.images_to_input(stacked.contiguous(), self.mapping.background)
                    with autocast(self.device, self.precision):
                        proba = _probabilities(self.network, x.to(self.device), self.flips)
                    proba = fit.probabilities_from_input(proba.float()).cpu()
            except torch.cuda.OutOfMemoryError as e:
                if self.batch_size == 1:
                    raise FewLabelError(
                        "Out of GPU memory predicting one slice: close other programs using "
                        "the GPU or predict on the CPU with --device cpu."
                    ) from e
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                logger.warning(
                    "GPU out of memory; predicting %d slices at a time.", self.batch_size
                )
                continue
            yield start, stop, proba
            start = stop


def _probabilities(network: TwoStreamUNet, x: torch.Tensor, flips: bool) -> torch.Tensor:
    """Mean-of-streams softmax ``(B, K, H, W)``, averaged over flipped copies when asked."""
    proba = network.predict_proba(x)
    if not flips:
        return proba
    for dims in ((3,), (2,)):
        proba = proba + network.predict_proba(x.flip(dims)).flip(dims)
    return proba / 3
