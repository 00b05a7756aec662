"""A fine-tuning job's data, checked and laid out for training.

:func:`prepare_data` reads a :class:`~napari_fewlabel.train.finetune.FinetuneJob`
once, before any step: it checks the labels against the scan (shape, grid,
integer values, one slice axis), picks the classes and the model to start
from, finds the labelled, marked-empty and unlabelled slices, normalises the
scan(s) into stacks of slices at the network's input size and, with
``planes="all"``, the planes across the labelled slices with their labelled
lines (:mod:`napari_fewlabel.data.planes`). Every problem a user can cause is a
:class:`~napari_fewlabel.errors.FewLabelError` raised here, before training
starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from napari_fewlabel.data.classes import SegmentationClass, check_classes, default_classes
from napari_fewlabel.data.input_fit import choose_input_size
from napari_fewlabel.data.normalization import (
    IntensityMapping,
    NormalizationConfig,
    count_nonfinite,
    fit_intensity,
)
from napari_fewlabel.data.planes import (
    MIN_SLICES_FOR_CROSS_PLANES,
    CrossPlane,
    in_plane_axes,
    line_targets,
    plane_fit,
)
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.data.slices import (
    check_empty_slices,
    check_one_axis,
    infer_slice_axis,
    labelled_slices,
)
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.save import smallest_label_dtype
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import ModelCard, is_encoder_only, read_card
from napari_fewlabel.models.registry import default_encoder, resolve_model
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train.events import Notice

if TYPE_CHECKING:
    from napari_fewlabel.train.finetune import FinetuneJob

#: ``FinetuneJob.model`` value that asks for a random start instead of the default encoder.
RANDOM_INIT = "random"


@dataclass
class PreparedData:
    """The job's data, checked and ready for sampling."""

    stacks: list[SliceStack]
    axis: int
    classes: tuple[SegmentationClass, ...]
    normalization: NormalizationConfig
    input_size: tuple[int, int]
    architecture: UNetConfig
    labelled: np.ndarray  # slice indices of stacks[0] used for training (empty ones included)
    empty: np.ndarray  # slice indices of stacks[0] marked empty (all background)
    held_out: np.ndarray  # slice indices of stacks[0] held out for validation
    labels_by_slice: dict[int, torch.Tensor]  # slice index -> (H, W) int64
    extra_labelled: list[tuple[int, int, torch.Tensor]]  # (stack index, slice index, labels)
    unlabelled_pool: list[tuple[int, int]]  # (stack index, slice index)
    notices: list[Notice]
    start_card: ModelCard | None
    start: str | Path | None  # the model training starts from (None: random)
    cross_planes: list[CrossPlane]  # the planes across the labelled slices (planes="all")
    plane_max_side: int  # longest side of a resampled cross-plane slice


def starting_model(job: FinetuneJob) -> str | Path | None:
    """The model ``job`` starts from: its own, the default encoder, or None (random)."""
    if job.model is not None:
        return None if str(job.model) == RANDOM_INIT else job.model
    path = default_encoder(job.image.modality)
    if path is None:
        return None
    encoder_arch = UNetConfig.from_dict(read_card(path).architecture)
    if replace(encoder_arch, num_classes=job.architecture.num_classes) != job.architecture:
        return None  # pretrained for another network than the one asked for
    return path


def _check_labels(job: FinetuneJob) -> np.ndarray:
    return _label_array(job.image, job.labels)


def _label_array(image: Volume, labels: Volume | np.ndarray) -> np.ndarray:
    """``labels`` checked to fit ``image`` and be a label map, in the smallest unsigned type.

    One byte per voxel for up to 255 classes: an int64 copy of a 512x512x600
    label map would be 1.2 GB, four times the CT it labels.
    """
    if isinstance(labels, Volume):
        if labels.shape != image.shape:
            raise FewLabelError(
                f"Labels shape {labels.shape} differs from the image shape {image.shape}: "
                "draw the labels on this scan (same size along every axis)."
            )
        if not np.allclose(labels.affine, image.affine, atol=1e-2):
            raise FewLabelError(
                "The labels and the image are not on the same grid (their voxel-to-world "
                "transforms differ): resample the labels onto the image, or draw them on it."
            )
        array = labels.array
    else:
        array = np.asarray(labels)
        if array.shape != image.shape:
            raise FewLabelError(
                f"Labels shape {array.shape} differs from the image shape {image.shape}: "
                "draw the labels on this scan (same size along every axis)."
            )
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise FewLabelError(
                "The labels contain non-integer values: save the label map as integers "
                "(0 = background, 1, 2, ... = structures)."
            )
    elif array.dtype.kind not in "iub":
        raise FewLabelError(f"Labels of type {array.dtype} are not a label map: use integers.")
    if array.min() < 0:
        raise FewLabelError(
            f"The labels contain a negative value ({int(array.min())}): use 0 for background "
            "and 1, 2, ... for structures."
        )
    return array.astype(smallest_label_dtype(int(array.max())), copy=False)


def _choose_classes(
    job: FinetuneJob, max_label: int, start_card: ModelCard | None
) -> tuple[SegmentationClass, ...]:
    if job.classes is not None:
        classes = check_classes(job.classes)
    elif start_card is not None and max_label < len(start_card.classes):
        classes = start_card.classes
    else:
        classes = default_classes(max(max_label, 1) + 1)
    if max_label >= len(classes):
        raise FewLabelError(
            f"The labels contain the value {max_label}, but there are only {len(classes)} "
            f"classes (0..{len(classes) - 1}: {', '.join(c.name for c in classes)}). "
            "Add the missing classes, or repaint the voxels with a valid value."
        )
    return classes


def prepare_data(job: FinetuneJob) -> PreparedData:
    notices: list[Notice] = []
    labels = _check_labels(job)
    start_card = None
    start = starting_model(job)
    unfit = default_encoder(job.image.modality) if job.model is None and start is None else None
    if unfit is not None:
        notices.append(
            Notice(
                f"The default encoder {unfit} was pretrained for another network than this "
                "job's, so training starts from a random initialisation. Pretrain it again "
                "with this version (`fewlabel pretrain`), or name a start with --model.",
                "warning",
            )
        )
    source = job.resume_from if job.resume_from is not None else start
    if source is not None:
        start_card = read_card(resolve_model(source))
    extra_label_arrays = [_label_array(image, lab) for image, lab in job.extra_labelled]
    max_label = max([int(labels.max())] + [int(a.max()) for a in extra_label_arrays])
    classes = _choose_classes(job, max_label, start_card)

    if job.axis is None:
        choice = infer_slice_axis(labels)
        axis = choice.axis
        notices.append(Notice(choice.reason))
    else:
        axis = job.axis
    check_one_axis(labels, axis)
    labelled = labelled_slices(labels, axis)
    if labelled.size == 0:
        raise FewLabelError(
            "No labelled slice found: every label is 0. Paint at least one slice "
            "(any nonzero value on a slice marks the whole slice as labelled)."
        )
    n_slices = labels.shape[axis]
    empty = check_empty_slices(labels, axis, job.empty_slices)
    unlabelled = np.setdiff1d(np.arange(n_slices), np.union1d(labelled, empty))

    held_out, why_not = _choose_held_out(
        labels, axis, labelled, job.settings.validation_min_labelled
    )
    if why_not:
        notices.append(Notice(why_not))

    image = job.image.array
    bad = count_nonfinite(image)
    if bad:
        if bad == image.size:
            raise FewLabelError("Every voxel of the image is NaN or Inf: check the file.")
        notices.append(
            Notice(
                f"{bad} image voxels are NaN or Inf; they are treated as the lowest "
                "intensity (background). Check the scan if that is unexpected.",
                "warning",
            )
        )

    if start_card is not None and not is_encoder_only(start_card):
        # A segmentation model: see the scan exactly as it was trained to, unless it learnt
        # another modality. Then the scan goes through its own modality's normalisation
        # (an MRI model fine-tuned on CT sees the HU window), which the fine-tuning adapts
        # the network to: on one painted CT slice, +0.056 Dice on the cardiac phantom and
        # +0.021 on the head pair against the MRI normalisation (docs/adaptation.md).
        learnt, scan = start_card.modality, job.image.modality
        normalization = start_card.normalization
        if "unknown" not in (learnt, scan) and learnt != scan:
            normalization = NormalizationConfig.for_modality(scan, window_hu=job.ct_window_hu)
            low, high = normalization.window_hu
            how = (
                f"the HU window {low:g} to {high:g}"
                if normalization.method == "ct_window"
                else "percentiles and z-score"
            )
            notices.append(
                Notice(
                    f"The start model learnt {learnt}, this scan is {scan}: the scan is "
                    f"normalised as {scan} models normalise it ({how}), and fine-tuning "
                    "adapts the model to that."
                )
            )
        architecture = replace(
            UNetConfig.from_dict(start_card.architecture), num_classes=len(classes)
        )
        input_size = start_card.input_size
    else:
        # Random start, or a pretrained encoder: pretraining normalised every scan
        # by its own modality as below, and an encoder is indifferent to input size.
        if start_card is not None:
            architecture = replace(
                UNetConfig.from_dict(start_card.architecture), num_classes=len(classes)
            )
        else:
            architecture = replace(job.architecture, num_classes=len(classes))
        normalization = NormalizationConfig.for_modality(
            job.image.modality, window_hu=job.ct_window_hu
        )
        slice_shape = tuple(s for a, s in enumerate(job.image.shape) if a != axis)
        input_size = choose_input_size(
            (slice_shape[0], slice_shape[1]),
            max_side=job.max_input_side,
            multiple=architecture.size_divisor,
        )

    mapping = fit_intensity(image, normalization)
    stacks = [SliceStack(image, axis, mapping, input_size)]
    given = np.union1d(labelled, empty)
    fitted = fit_labels(labels, axis, given, stacks[0].fit)
    labels_by_slice = {int(i): fitted[n] for n, i in enumerate(given)}
    plane_max_side = max(job.max_input_side, *input_size)
    cross_planes: list[CrossPlane] = []
    small = (
        _smallest_structure(labels, axis, labelled, classes)
        if job.settings.planes == "auto"
        else None
    )
    if small is not None:
        name, share = small
        notices.append(
            Notice(
                f"{name} covers {share:.1%} of the slices it is painted on: a structure this "
                "small is learnt on the painted plane only (planes across the painted slices "
                "help large structures; docs/engine.md). Force them with --planes all."
            )
        )
    elif job.settings.planes in ("all", "auto"):
        cross_planes, why_not = _cross_planes(
            job, labels, axis, given, mapping, stacks[0], architecture, plane_max_side
        )
        notices.append(Notice(why_not or _describe_planes(cross_planes, axis)))

    pool = [(0, int(i)) for i in unlabelled]
    extra_labelled: list[tuple[int, int, torch.Tensor]] = []
    for (extra_image, _), extra_labels in zip(job.extra_labelled, extra_label_arrays, strict=True):
        if count_nonfinite(extra_image.array) == extra_image.array.size:
            raise FewLabelError("An extra labelled volume is all NaN or Inf: drop it.")
        stack = SliceStack(
            extra_image.array, axis, fit_intensity(extra_image.array, normalization), input_size
        )
        extra_slices = labelled_slices(extra_labels, axis)
        fitted_extra = fit_labels(extra_labels, axis, extra_slices, stack.fit)
        extra_labelled.extend(
            (len(stacks), int(i), fitted_extra[n]) for n, i in enumerate(extra_slices)
        )
        rest = np.setdiff1d(np.arange(len(stack)), extra_slices)
        pool.extend((len(stacks), int(i)) for i in rest)
        stacks.append(stack)
    for extra in job.extra_unlabelled:
        if count_nonfinite(extra.array) == extra.array.size:
            raise FewLabelError("An extra unlabelled volume is all NaN or Inf: drop it.")
        stack = SliceStack(extra.array, axis, fit_intensity(extra.array, normalization), input_size)
        pool.extend((len(stacks), i) for i in range(len(stack)))
        stacks.append(stack)
    if job.settings.unlabelled_loss == "cps" and not pool:
        notices.append(
            Notice(
                "Every slice is labelled and no extra unlabelled scan was given, so there is "
                "nothing for the semi-supervised term: training supervised only.",
                "warning",
            )
        )

    train_labelled = np.setdiff1d(given, held_out)
    return PreparedData(
        stacks=stacks,
        axis=axis,
        classes=classes,
        normalization=normalization,
        input_size=input_size,
        architecture=architecture,
        labelled=train_labelled,
        empty=empty,
        held_out=held_out,
        labels_by_slice=labels_by_slice,
        extra_labelled=extra_labelled,
        unlabelled_pool=pool,
        notices=notices,
        start_card=start_card,
        start=start,
        cross_planes=cross_planes,
        plane_max_side=plane_max_side,
    )


_PLANE_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}


#: With ``planes="auto"``, when two or more structures are painted and one of them covers
#: on average less than this share of the painted slices it is on, the run trains on
#: the painted plane only. Measured (docs/engine.md, docs/benchmarks.md): six deep grey
#: nuclei (0.4 % each) were lost with the planes across (Dice 0.02 at k = 1 against
#: 0.43 without), and so were the cardiac phantom's aorta and left atrium (1.05 % and
#: 1.14 %, each on one of two painted slices: Dice 0.01 and 0.44 with the class-balanced
#: loss), while large structures (10 % and more) gained 0.03-0.05. A single small
#: structure (the brain and lung tumours, 0.3-1.1 %) gains from the planes across
#: (mean Dice over k = 1-3, three seeds: +0.04 and +0.08), so it keeps them.
SMALL_STRUCTURE_SHARE = 0.02


def _smallest_structure(
    labels: np.ndarray,
    axis: int,
    labelled: np.ndarray,
    classes: tuple[SegmentationClass, ...],
) -> tuple[str, float] | None:
    """The painted structure with the smallest mean share of the slices it is on, if small.

    None when every painted structure covers at least :data:`SMALL_STRUCTURE_SHARE`, or
    when only one structure is painted (a lone small structure gains from the planes
    across; the rule protects small structures from their larger neighbours).
    """
    shares: dict[int, list[float]] = {}
    for i in labelled:
        painted = np.take(labels, int(i), axis=axis)
        values, counts = np.unique(painted, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value:
                shares.setdefault(value, []).append(count / painted.size)
    if len(shares) < 2:
        return None
    value, share = min(((v, float(np.mean(s))) for v, s in shares.items()), key=lambda t: t[1])
    if share >= SMALL_STRUCTURE_SHARE:
        return None
    return classes[value].name, share


def _cross_planes(
    job: FinetuneJob,
    labels: np.ndarray,
    axis: int,
    given: np.ndarray,
    mapping: IntensityMapping,
    main: SliceStack,
    architecture: UNetConfig,
    max_side: int,
) -> tuple[list[CrossPlane], str | None]:
    """The two planes across the labelled slices, or none and why not."""
    n = labels.shape[axis]
    if n < MIN_SLICES_FOR_CROSS_PLANES:
        return [], (
            f"The scan has {n} slices along the labelled axis, too few for slices across "
            f"them (at least {MIN_SLICES_FOR_CROSS_PLANES}): training on the labelled plane only."
        )
    planes = []
    for plane in in_plane_axes(axis):
        fit = plane_fit(
            job.image.shape, job.image.spacing_mm, axis, plane, main.fit,
            architecture.size_divisor, max_side,
        )  # fmt: skip
        stack = SliceStack(job.image.array, plane, mapping, fit.input_size, fit=fit)
        planes.append(CrossPlane(plane, stack, line_targets(labels, axis, given, plane, fit)))
    return planes, None


def _describe_planes(planes: list[CrossPlane], axis: int) -> str:
    parts = [
        f"{len(p)} {_PLANE_NAMES.get(p.axis, f'axis-{p.axis}')} slices at "
        f"{p.stack.fit.input_size[0]}x{p.stack.fit.input_size[1]}"
        for p in planes
    ]
    return (
        "Also training on the planes across the labelled slices, whose labelled lines "
        f"supervise them ({', '.join(parts)}); prediction averages the three planes."
    )


def painted_slices(data: PreparedData) -> list[int]:
    """Slices of the scan with painted labels (training and held out), without the empty ones."""
    return [int(i) for i in np.setdiff1d(np.union1d(data.labelled, data.held_out), data.empty)]


def _choose_held_out(
    labels: np.ndarray, axis: int, labelled: np.ndarray, min_labelled: int | None
) -> tuple[np.ndarray, str | None]:
    """Labelled slices to hold out for a validation Dice, and why none when there are none.

    About one in five labelled slices, evenly spread, is held out, but only when
    at least ``min_labelled`` slices are labelled and every structure on the
    held-out slices is also on a slice that stays in training: a structure
    seen on one slice only must be trained on, not used to keep score.
    """
    none = np.array([], dtype=np.int64)
    if labelled.size < 2 or min_labelled is None:
        return none, None
    if labelled.size < min_labelled:
        return none, (
            f"No validation Dice: {labelled.size} labelled slices all go into training "
            f"(a slice is held out for validation from {min_labelled} labelled slices on)."
        )
    n_hold = max(1, round(0.2 * labelled.size))
    positions = sorted({int(p + 0.5) for p in np.linspace(0, labelled.size - 1, n_hold + 2)[1:-1]})
    held_out = labelled[positions]
    kept = np.setdiff1d(labelled, held_out)
    classes_kept = set(np.unique(np.take(labels, kept, axis=axis)).tolist())
    classes_held = set(np.unique(np.take(labels, held_out, axis=axis)).tolist())
    if not classes_held <= classes_kept:
        return none, (
            "No validation Dice: a structure appears only on the slice that would be held "
            "out, so every labelled slice goes into training. Paint one more slice with it "
            "to get a validation score."
        )
    return held_out, None
