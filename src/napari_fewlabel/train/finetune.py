"""Fine-tune a two-stream U-Net on a few labelled slices (IDEAL, with measured improvements).

``run(job)`` is a generator of events (:mod:`napari_fewlabel.train.events`):
:class:`Notice` for choices the user should know about, :class:`Progress`
after every step, and one final :class:`Done` with the last checkpoint, also
when cancelled.

One step
--------
* Labelled slices (any nonzero label on the slice): Dice + CE on both streams.
* Unlabelled slices (the rest of the volume and any extra volumes): each
  stream learns from the other's hard pseudo-labels (cross pseudo-supervision),
  with no gradient through the pseudo-labels. The term starts after a
  supervised warm-up and is ramped up with a sigmoid; pseudo-labels may be
  restricted to confident pixels and taken from a weakly augmented view while
  the loss is computed on a strongly augmented one.
* AdamW: a short linear warm-up, a constant learning rate, a cosine decay
  over the last quarter.

Which of these choices are on by default, and why, is measured in
``docs/engine.md`` / ``docs/benchmarks.md``; :meth:`FinetuneSettings.paper`
gives the settings as published, and the model card records what was used.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from napari_fewlabel import __version__
from napari_fewlabel.data.augment import (
    AugmentConfig,
    jitter_intensity,
    random_geometry,
    strong_view,
    warp,
)
from napari_fewlabel.data.classes import SegmentationClass, check_classes, default_classes
from napari_fewlabel.data.input_fit import choose_input_size
from napari_fewlabel.data.normalization import (
    IntensityMapping,
    NormalizationConfig,
    count_nonfinite,
    fit_intensity,
)
from napari_fewlabel.data.planes import CrossPlane, in_plane_axes, line_targets, plane_fit
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.data.slices import (
    check_empty_slices,
    check_one_axis,
    infer_slice_axis,
    labelled_slices,
)
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.losses.cross_pseudo_supervision import (
    cross_pseudo_supervision_loss,
    sigmoid_rampup,
)
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    check_output_path,
    is_encoder_only,
    load_checkpoint,
    load_encoder_weights,
    load_optimizer_state,
    read_card,
    save_checkpoint,
)
from napari_fewlabel.models.registry import default_encoder, resolve_model
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.device import (
    autocast,
    describe_device,
    memory_mb,
    precision_for,
    resolve_device,
)
from napari_fewlabel.train.events import CancelFlag, Done, Event, Notice, Progress

#: Default number of steps: about 4-5 minutes on 2 CPU cores for 256x256 slices.
DEFAULT_STEPS = 300
#: ``FinetuneJob.model`` value that asks for a random start instead of the default encoder.
RANDOM_INIT = "random"

T = TypeVar("T")


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune; the defaults are the winners of the annotation-efficiency ablation.

    Attributes
    ----------
    batch_labelled, batch_unlabelled : int
        Slices per step from each pool (labelled slices repeat, augmented).
    learning_rate, weight_decay : float
        AdamW settings; the learning rate is constant, then decays over the
        last quarter of the steps.
    unlabelled_loss : {"cps", "none"}
        Cross pseudo-supervision on unlabelled slices, or supervised only.
    cps_weight : float
        Weight of the cross pseudo-supervision term once ramped up.
    supervised_warmup : float
        Fraction of the steps trained with labels only before the unlabelled
        term starts (0 = from the first step, as in the paper).
    cps_rampup : float
        Fraction of the steps over which the term's weight rises (sigmoid ramp).
    confidence_threshold : float
        Pseudo-labels below this softmax confidence are ignored (0 keeps all).
    strong_view : bool
        Pseudo-labels from a weak view, loss on a strong view (FixMatch
        pairing); False uses one view for both, as in the paper.
    augment : AugmentConfig
    validation_min_labelled : int or None
        Hold out about one labelled slice in five for a validation Dice only
        from this many labelled slices on (and only when each held-out
        structure is also on a training slice). None (the default) never
        holds a label out: with 3 labelled slices, holding one out trains most
        of the run on 2. The agreement between the two streams on unlabelled
        slices is reported instead; it costs no label.
    validation_rejoin_at : float or None
        Held-out slices join training at this fraction of the steps so no
        label is wasted (None keeps them out to the end).
    validate_every : int
        Steps between validation Dice evaluations.
    test_time_flips : bool
        Default for prediction: average over flipped copies (only useful
        when trained with flips).
    encoder_lr_scale : float
        The encoder's learning rate relative to the decoders' when training
        starts from trained weights (a pretrained encoder or a model); 1
        trains all at one rate. Below 1 keeps more of what pretraining
        learned.
    encoder_frozen_for : float
        Fraction of the steps during which a trained encoder stays frozen
        while the decoders learn on its features, before all weights train
        (LP-FT, Kumar et al., ICLR 2022: a random head's first gradients
        otherwise distort the pretrained features). 0 trains it from the
        first step; a random start is never frozen.
    empty_share : float
        At most this fraction of the labelled draws come from slices marked
        empty; painted slices take the rest (each group drawn evenly). 1
        draws every labelled slice equally, so one painted slice beside two
        marked ones would be a third of the draws. The paper has no marked
        slices, so this is not a departure from it.
    planes : {"labelled", "all"}
        ``"labelled"`` trains on slices of the labelled plane only, as the
        paper does. ``"all"`` also trains on the two planes across it, whose
        slices carry the labelled slices' lines (every other voxel ignored by
        the loss, :mod:`napari_fewlabel.data.planes`), and prediction averages
        the three planes' probabilities: context across slices from the same
        2D network.
    labelled_plane_share : float
        With ``planes="all"``, the fraction of steps drawn from the labelled
        plane; the two other planes share the rest.
    """

    batch_labelled: int = 4
    batch_unlabelled: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    unlabelled_loss: Literal["cps", "none"] = "cps"
    cps_weight: float = 1.0
    supervised_warmup: float = 0.3
    cps_rampup: float = 0.3
    confidence_threshold: float = 0.9
    strong_view: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation_min_labelled: int | None = None
    validation_rejoin_at: float | None = 0.8
    validate_every: int = 25
    test_time_flips: bool = False
    encoder_lr_scale: float = 1.0
    encoder_frozen_for: float = 0.0
    empty_share: float = 0.5
    planes: Literal["labelled", "all"] = "labelled"
    labelled_plane_share: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_labelled < 1 or self.batch_unlabelled < 1:
            raise FewLabelError("Batch sizes must be at least 1.")
        if self.unlabelled_loss not in ("cps", "none"):
            raise FewLabelError(
                f"unlabelled_loss must be 'cps' or 'none', got {self.unlabelled_loss!r}."
            )
        if not 0 <= self.confidence_threshold < 1:
            raise FewLabelError("confidence_threshold must be in [0, 1).")
        if not 0 < self.encoder_lr_scale <= 1:
            raise FewLabelError("encoder_lr_scale must be in (0, 1].")
        if not 0 <= self.encoder_frozen_for < 1:
            raise FewLabelError(
                "encoder_frozen_for is a fraction of the steps: give a value in [0, 1)."
            )
        if self.planes not in ("labelled", "all"):
            raise FewLabelError(f"planes must be 'labelled' or 'all', got {self.planes!r}.")
        if not 0 < self.labelled_plane_share <= 1:
            raise FewLabelError("labelled_plane_share must be in (0, 1].")
        if not 0 < self.empty_share <= 1:
            raise FewLabelError(
                "empty_share is a fraction of the labelled draws: give a value in (0, 1]."
            )

    @classmethod
    def paper(cls) -> FinetuneSettings:
        """IDEAL as published: CPS from the first step under a sigmoid ramp, every pseudo-label, one view."""
        return cls(
            supervised_warmup=0.0,
            cps_rampup=0.4,
            confidence_threshold=0.0,
            strong_view=False,
        )

    @classmethod
    def supervised(cls) -> FinetuneSettings:
        """Labelled slices only (both streams, Dice + CE)."""
        return cls(unlabelled_loss="none")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneSettings:
        kwargs = dict(d)
        kwargs["augment"] = AugmentConfig.from_dict(kwargs.get("augment", {}))
        return cls(**kwargs)

    def differences_from_paper(self, in_slices: int) -> list[str]:
        """Human-readable list of where these settings depart from the published method."""
        out = []
        if self.unlabelled_loss == "none":
            out.append("no unlabelled term (supervised only)")
        else:
            if self.supervised_warmup > 0:
                out.append(
                    f"supervised warm-up for the first {self.supervised_warmup:.0%} of steps"
                )
            if self.confidence_threshold > 0:
                out.append(f"pseudo-labels only where confidence >= {self.confidence_threshold}")
            if self.strong_view:
                out.append("pseudo-labels from a weak view supervise a strong view")
        if in_slices > 1:
            out.append(f"{in_slices} adjacent slices as input channels (2.5D)")
        if self.planes == "all":
            out.append(
                "also trained on the two planes across the labelled slices (their labelled "
                "lines), prediction averaged over three planes"
            )
        if self.test_time_flips:
            out.append("flip test-time augmentation")
        if self.encoder_frozen_for > 0:
            out.append(
                f"a trained encoder frozen for the first {self.encoder_frozen_for:.0%} of steps"
            )
        return out


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a fine-tuning run needs; the defaults give a good model.

    Attributes
    ----------
    image : Volume
        The scan, ``(z, y, x)``.
    labels : Volume or ndarray
        Label map of the same shape (and geometry); slices with any nonzero
        value are labelled, 0 there is background. A slice of all zeros is
        unlabelled unless it is in ``empty_slices``.
    empty_slices : tuple of int
        Slices (indices along the slice axis) checked and found to hold none
        of the structures: trained on as all background, like a labelled
        slice. Marking a few slices away from the structure is how a user
        says "nothing here" and removes false positives there.
    out : Path
        Checkpoint to write (``.safetensors``); rewritten atomically during training.
    classes : tuple of SegmentationClass, optional
        Names and colours; default: ``0..max(labels)`` named ``class i``.
    model : str or Path, optional
        Model to start from (registry name or path). Its encoder is reused;
        its decoders too when the classes match. Default (None): the shipped
        pretrained encoder (:func:`~napari_fewlabel.models.registry.default_encoder`)
        when one is installed and fits ``architecture``, else a random
        initialisation; :data:`RANDOM_INIT` (``"random"``) asks for random.
    resume_from : Path, optional
        A checkpoint written by an earlier run of this job to continue from
        (weights, optimizer and step count).
    axis : int, optional
        Slice axis of the ``(z, y, x)`` array; default: inferred from the labels.
    steps : int
        Training steps.
    time_budget_s : float, optional
        Stop after this many seconds even if ``steps`` are not done (the
        schedules then follow elapsed time).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    seed : int
    settings : FinetuneSettings
    architecture : UNetConfig
        Network for a random start (``num_classes`` is set from the classes).
    max_input_side : int
        Slices larger than this are shrunk to fit (aspect kept) and predictions
        resized back.
    ct_window_hu : tuple of float
        HU window for CT normalisation.
    extra_unlabelled : tuple of Volume
        More scans of the same kind for the unlabelled term.
    extra_labelled : tuple of (Volume, Volume or ndarray)
        More labelled scans of the same kind, as ``(image, labels)`` pairs on
        one grid each: their labelled slices join the labelled pool (e.g. a
        source model for MRI -> CT adaptation trained on several MRI volumes),
        their other slices the unlabelled one. Validation slices are held out
        from ``image`` only.
    checkpoint_every_s : float
        Seconds between intermediate checkpoints.
    """

    image: Volume
    labels: Volume | np.ndarray
    out: Path
    classes: tuple[SegmentationClass, ...] | None = None
    model: str | Path | None = None
    resume_from: Path | None = None
    axis: int | None = None
    empty_slices: tuple[int, ...] = ()
    steps: int = DEFAULT_STEPS
    time_budget_s: float | None = None
    device: str = "auto"
    seed: int = 0
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)
    architecture: UNetConfig = field(default_factory=UNetConfig)
    max_input_side: int = 256
    ct_window_hu: tuple[float, float] = (-300.0, 400.0)
    extra_unlabelled: tuple[Volume, ...] = ()
    extra_labelled: tuple[tuple[Volume, Volume | np.ndarray], ...] = ()
    checkpoint_every_s: float = 60.0


# ------------------------------------------------------------------ data prep
@dataclass
class _Prepared:
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
    """``labels`` as an int64 array after checking it fits ``image`` and is a label map."""
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
    return array.astype(np.int64, copy=False)


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


def _prepare(job: FinetuneJob) -> _Prepared:
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
        # A segmentation model: see the scan exactly as it was trained to.
        normalization = start_card.normalization
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
    if job.settings.planes == "all":
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
    return _Prepared(
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


#: Fewest slices along the labelled axis for the planes across it to be worth training:
#: a coronal slice of a 4-slice scan is 4 rows tall.
MIN_SLICES_FOR_CROSS_PLANES = 8

_PLANE_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}


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


def labelled_draw_probabilities(is_empty: np.ndarray, empty_share: float) -> np.ndarray | None:
    """How often to draw each labelled slice, or None when every slice is drawn equally.

    Parameters
    ----------
    is_empty : ndarray of bool
        One entry per labelled slice: True where the slice is marked empty.
    empty_share : float
        The most the marked slices may take of the draws together.

    Returns
    -------
    ndarray or None
        Probabilities summing to 1 (marked slices share ``empty_share`` evenly,
        painted ones the rest), or None when equal draws already keep the
        marked slices within their share.
    """
    n, n_empty = is_empty.size, int(np.count_nonzero(is_empty))
    if n_empty in (0, n) or n_empty <= empty_share * n:
        return None
    return np.where(is_empty, empty_share / n_empty, (1 - empty_share) / (n - n_empty))


def _painted_slices(data: _Prepared) -> list[int]:
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


# ------------------------------------------------------------ out of memory
@dataclass(frozen=True)
class BatchSizes:
    """Slices per step from the labelled and the unlabelled pool."""

    labelled: int
    unlabelled: int

    def halved(self) -> BatchSizes | None:
        """Both halved (at least 1), or None when both are already 1."""
        if self.labelled == 1 and self.unlabelled == 1:
            return None
        return BatchSizes(max(1, self.labelled // 2), max(1, self.unlabelled // 2))


def step_with_oom_fallback(
    step: Callable[[BatchSizes], T],
    batch: BatchSizes,
    *,
    advice: str,
) -> tuple[T, BatchSizes, list[Notice]]:
    """Run ``step(batch)``; on a CUDA out-of-memory error halve the batch and retry.

    Parameters
    ----------
    step : callable
        One training step for the given batch sizes.
    batch : BatchSizes
    advice : str
        What the user can change, for the error at batch size 1.

    Returns
    -------
    result, batch sizes that worked, notices about reductions

    Raises
    ------
    FewLabelError
        When even one slice per pool does not fit.
    """
    notices: list[Notice] = []
    while True:
        try:
            return step(batch), batch, notices
        except torch.cuda.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = batch.halved()
            if smaller is None:
                raise FewLabelError(
                    f"Out of GPU memory even with one labelled and one unlabelled slice per "
                    f"step ({e.args[0].splitlines()[0] if e.args else 'CUDA OOM'}). {advice}"
                ) from e
            notices.append(
                Notice(
                    f"GPU out of memory at batch {batch.labelled}+{batch.unlabelled} slices; "
                    f"continuing with {smaller.labelled}+{smaller.unlabelled}.",
                    "warning",
                )
            )
            batch = smaller


# --------------------------------------------------------------------- run
#: ``started_from`` of a run without trained weights (model cards record it).
RANDOM_START = "random initialisation"


def _parameter_groups(
    network: TwoStreamUNet, settings: FinetuneSettings, pretrained: bool
) -> list[dict[str, Any]]:
    """One optimizer group, or the encoder apart at ``encoder_lr_scale`` for a trained start."""
    scale = settings.encoder_lr_scale if pretrained else 1.0
    if scale == 1.0:
        return [{"params": list(network.parameters()), "lr_scale": 1.0}]
    encoder = list(network.encoder.parameters())
    ids = {id(p) for p in encoder}
    rest = [p for p in network.parameters() if id(p) not in ids]
    return [{"params": encoder, "lr_scale": scale}, {"params": rest, "lr_scale": 1.0}]


def _lr_factor(progress: float, step: int) -> float:
    """Learning-rate multiplier: linear warm-up over 10 steps, constant, cosine to 0.1 over the last 25 %.

    A cosine over the whole run starved the small structures, which a few-slice
    run learns last (mean Dice 0.48 vs 0.86 at 200 steps on the phantom).
    """
    warm = min(1.0, (step + 1) / 10)
    decay = max(0.0, (progress - 0.75) / 0.25)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))


def _foreground_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float | None:
    """Mean Dice over foreground classes present in ``truth`` or ``pred`` (hard labels)."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        denom = int(p.sum() + t.sum())
        if denom:
            scores.append(2 * int((p & t).sum()) / denom)
    return float(np.mean(scores)) if scores else None


def run(job: FinetuneJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Fine-tune on ``job``; yields Notice/Progress events and one final Done.

    Parameters
    ----------
    job : FinetuneJob
    cancel : CancelFlag, optional
        Checked between steps; when set, the current weights are saved and
        ``Done(cancelled=True)`` is yielded.

    Raises
    ------
    FewLabelError
        For any problem with the inputs (raised before training starts) or a
        GPU that runs out of memory at batch size 1.
    """
    out = check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    data = _prepare(job)
    yield from data.notices

    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    rng = np.random.default_rng(job.seed)
    device = resolve_device(job.device)
    device_text = describe_device(device)
    precision = precision_for(device)
    settings = job.settings
    use_cps = settings.unlabelled_loss == "cps" and bool(data.unlabelled_pool)

    network = TwoStreamUNet(data.architecture)
    step0 = 0
    started_from = RANDOM_START
    optimizer_state = None
    if job.resume_from is not None:
        resumed = load_checkpoint(resolve_model(job.resume_from))
        if resumed.card.classes != data.classes:
            raise FewLabelError(
                "The checkpoint to resume has other classes than this job: resume with the "
                "same labels and classes, or start a new run with --model."
            )
        network.load_state_dict(resumed.network.state_dict())
        step0 = int(resumed.card.training.get("steps_done", 0))
        started_from = str(resumed.card.training.get("started_from", started_from))
        optimizer_state = load_optimizer_state(resolve_model(job.resume_from))
        yield Notice(f"Resuming from {Path(job.resume_from).name} at step {step0}.")
    elif data.start is not None:
        path = resolve_model(data.start)
        name = Path(data.start).name if job.model is None else str(job.model)
        assert data.start_card is not None
        if not is_encoder_only(data.start_card) and data.start_card.classes == data.classes:
            network.load_state_dict(load_checkpoint(path).network.state_dict())
            started_from = f"{name} (all weights)"
        else:
            load_encoder_weights(network, path)
            started_from = f"{name} (encoder)"
        yield Notice(f"Starting from {started_from}.")
    network.to(device).train()

    trained_start = started_from != RANDOM_START
    optimizer = torch.optim.AdamW(
        _parameter_groups(network, settings, trained_start),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None

    in_slices = data.architecture.in_slices
    main = data.stacks[0]
    batch = BatchSizes(settings.batch_labelled, settings.batch_unlabelled)
    labelled_pool = data.labelled
    held_out = data.held_out
    rejoined = False
    last_val_dice: float | None = None
    losses: dict[str, float] = {}
    total = job.steps
    start = time.perf_counter()
    last_save = start
    step_times: list[float] = []
    advice = (
        f"The input is {data.input_size[0]}x{data.input_size[1]}: use a smaller --max-input-side, "
        "close other programs using the GPU, or train on the CPU with --device cpu."
    )

    def progress_at(step: int) -> float:
        p = step / job.steps
        if job.time_budget_s is not None:
            p = max(p, (time.perf_counter() - start) / job.time_budget_s)
        return min(1.0, p)

    def card_for(steps_done: int) -> ModelCard:
        return ModelCard(
            architecture=data.architecture.to_dict(),
            classes=data.classes,
            modality=job.image.modality,
            normalization=data.normalization,
            input_size=data.input_size,
            slice_axis=data.axis,
            training={
                "method": (
                    "IDEAL two-stream fine-tuning: Dice+CE on labelled slices, cross "
                    "pseudo-supervision on unlabelled slices"
                    if use_cps
                    else "two-stream supervised fine-tuning: Dice+CE on labelled slices"
                )
                + (
                    "; tri-planar: coronal and sagittal slices trained on the labelled "
                    "slices' lines, the three planes averaged at prediction"
                    if data.cross_planes
                    else ""
                ),
                "paper_faithful": not settings.differences_from_paper(in_slices) and use_cps,
                "differences_from_paper": settings.differences_from_paper(in_slices),
                "settings": settings.to_dict(),
                "data": {
                    "image_shape": list(job.image.shape),
                    "spacing_mm": list(job.image.spacing_mm),
                    "modality": job.image.modality,
                    "slice_axis": data.axis,
                    "labelled_slices": _painted_slices(data),
                    "empty_slices": [int(i) for i in data.empty],
                    "held_out_slices": [int(i) for i in data.held_out],
                    "unlabelled_slices": len(data.unlabelled_pool),
                    "extra_unlabelled_volumes": len(job.extra_unlabelled),
                    "extra_labelled_volumes": len(job.extra_labelled),
                    "source": str(job.image.header.get("path", "in memory")),
                },
                "started_from": started_from,
                "steps_done": steps_done,
                "steps_planned": total,
                "seed": job.seed,
                "val_dice": last_val_dice,
                "device": device_text,
                "precision": precision.name,
                "train_seconds": round(time.perf_counter() - start, 1),
            },
            inference={
                "test_time_flips": settings.test_time_flips,
                "planes": [data.axis, *(p.axis for p in data.cross_planes)],
                "plane_max_side": data.plane_max_side,
            },
        )

    def save(steps_done: int) -> Path:
        network.eval()
        path = save_checkpoint(out, network, card_for(steps_done), optimizer=optimizer)
        network.train()
        return path

    def draw_weights(pool: np.ndarray) -> np.ndarray | None:
        """Draw probabilities over ``pool`` then the extra labelled slices (None: equal)."""
        is_empty = np.concatenate(
            [np.isin(pool, data.empty), np.zeros(len(data.extra_labelled), bool)]
        )
        return labelled_draw_probabilities(is_empty, settings.empty_share)

    weights = draw_weights(labelled_pool)  # again when held-out slices rejoin

    def sample_labelled(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Without weights this is the stream of rng.choice(labelled_pool), as before the cap.
        picks = rng.choice(len(labelled_pool) + len(data.extra_labelled), size=n, p=weights)
        if (picks < len(labelled_pool)).all():  # all from the scan: one batched read
            centres = labelled_pool[picks]
            x = main.windows(torch.from_numpy(centres), in_slices)
            y = torch.stack([data.labels_by_slice[int(c)] for c in centres])
            return x, y
        xs, ys = [], []
        for k in picks:
            if k < len(labelled_pool):
                s, i, y = 0, int(labelled_pool[k]), data.labels_by_slice[int(labelled_pool[k])]
            else:
                s, i, y = data.extra_labelled[k - len(labelled_pool)]
            xs.append(data.stacks[s].windows(torch.tensor([i]), in_slices))
            ys.append(y)
        return torch.cat(xs), torch.stack(ys)

    def sample_unlabelled(n: int) -> torch.Tensor:
        picks = rng.integers(0, len(data.unlabelled_pool), size=n)
        windows = [
            data.stacks[s].windows(torch.tensor([i]), in_slices)
            for s, i in (data.unlabelled_pool[p] for p in picks)
        ]
        return torch.cat(windows)

    # A stream of its own, so that a labelled-plane-only run draws exactly as before.
    plane_rng = np.random.default_rng([job.seed, 1])

    def choose_plane() -> CrossPlane | None:
        """The plane of this step's slices: None for the labelled plane."""
        if not data.cross_planes or plane_rng.random() < settings.labelled_plane_share:
            return None
        return data.cross_planes[int(plane_rng.integers(len(data.cross_planes)))]

    def train_step(b: BatchSizes, step: int) -> dict[str, float]:
        p = progress_at(step)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _lr_factor(p, step) * group["lr_scale"]
        # A frozen encoder gets no gradient, so AdamW leaves it (and its moments) alone.
        network.encoder.requires_grad_(not (trained_start and p < settings.encoder_frozen_for))
        cps_w = 0.0
        if use_cps and p >= settings.supervised_warmup:
            cps_w = settings.cps_weight * sigmoid_rampup(
                p - settings.supervised_warmup, settings.cps_rampup
            )
        optimizer.zero_grad(set_to_none=True)
        aug = settings.augment
        plane = choose_plane()
        if plane is None:
            x_l, y_l = sample_labelled(b.labelled)
        else:
            x_l, y_l = plane.labelled_batch(b.labelled, in_slices, rng)
        x_l, y_l = x_l.to(device), y_l.to(device)
        x_l, y_l_warped = warp(x_l, y_l, random_geometry(b.labelled, aug, generator, device))
        assert y_l_warped is not None
        x_l = jitter_intensity(
            x_l,
            generator,
            contrast=aug.contrast,
            brightness=aug.brightness,
            noise_std=aug.noise_std,
        )
        parts: dict[str, float] = {}
        with autocast(device, precision):
            if cps_w > 0:
                unlabelled = (
                    sample_unlabelled(b.unlabelled)
                    if plane is None
                    else plane.unlabelled_batch(b.unlabelled, in_slices, rng)
                )
                x_u, _ = warp(
                    unlabelled.to(device),
                    None,
                    random_geometry(b.unlabelled, aug, generator, device),
                )
                weak = jitter_intensity(
                    x_u, generator, contrast=aug.contrast, brightness=aug.brightness,
                    noise_std=aug.noise_std,
                )  # fmt: skip
                teacher_a = teacher_b = None
                student_input = weak
                if settings.strong_view:
                    with torch.no_grad():
                        teacher_a, teacher_b = network(weak)
                    student_input = strong_view(weak, aug, generator)
                logits_a, logits_b = network(torch.cat([x_l, student_input]))
                n = b.labelled
                sup_a, pa = dice_ce_loss(logits_a[:n], y_l_warped)
                sup_b, _ = dice_ce_loss(logits_b[:n], y_l_warped)
                cps, pc = cross_pseudo_supervision_loss(
                    logits_a[n:],
                    logits_b[n:],
                    teacher_1=teacher_a,
                    teacher_2=teacher_b,
                    threshold=settings.confidence_threshold,
                )
                loss = sup_a + sup_b + cps_w * cps
                parts = {"cps": float(cps.detach()), "cps_kept": pc["cps_kept"]}
            else:
                logits_a, logits_b = network(x_l)
                sup_a, pa = dice_ce_loss(logits_a, y_l_warped)
                sup_b, _ = dice_ce_loss(logits_b, y_l_warped)
                loss = sup_a + sup_b
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if not math.isfinite(float(loss.detach())):
            raise FewLabelError(
                "Training diverged (the loss became NaN/Inf): lower the learning rate, "
                "or check the image for extreme values."
            )
        return {
            "total": float(loss.detach()),
            "supervised": float((sup_a + sup_b).detach()) / 2,
            "train_dice": pa["dice"],
            "cps_weight": cps_w,
            **parts,
        }

    @torch.no_grad()
    def validate() -> float | None:
        if held_out.size == 0:
            return None
        network.eval()
        preds, truths = [], []
        for i in held_out:
            x = main.windows(torch.tensor([int(i)]), in_slices).to(device)
            with autocast(device, precision):
                proba = network.predict_proba(x)
            preds.append(proba.argmax(dim=1).cpu())
            truths.append(data.labels_by_slice[int(i)][None])
        network.train()
        return _foreground_dice(torch.cat(preds), torch.cat(truths), len(data.classes))

    agreement_slices = np.array([i for s, i in data.unlabelled_pool if s == 0], dtype=np.int64)
    if agreement_slices.size > 8:
        agreement_slices = agreement_slices[
            np.linspace(0, agreement_slices.size - 1, 8).astype(int)
        ]

    @torch.no_grad()
    def stream_agreement() -> float | None:
        """Dice between the two streams' labels on a few unlabelled slices (costs no label)."""
        if agreement_slices.size == 0:
            return None
        network.eval()
        x = main.windows(torch.from_numpy(agreement_slices), in_slices).to(device)
        with autocast(device, precision):
            logits_a, logits_b = network(x)
        network.train()
        return _foreground_dice(
            logits_a.argmax(dim=1).cpu(), logits_b.argmax(dim=1).cpu(), len(data.classes)
        )

    agreement: float | None = None
    marked = f" ({data.empty.size} of them marked empty)" if data.empty.size else ""
    yield Notice(
        f"Fine-tuning on {device_text} ({precision.name}): "
        f"{len(labelled_pool) + len(data.extra_labelled)} labelled "
        f"slice(s) for training{marked}, {held_out.size} held out for validation, "
        f"{len(data.unlabelled_pool)} unlabelled slice(s), input "
        f"{data.input_size[0]}x{data.input_size[1]}, {total} steps."
    )
    checkpoint: Path | None = None
    step = step0
    if step0 >= total:
        yield Notice(f"The checkpoint has already done {step0} of {total} steps: nothing to train.")
    while step < total and progress_at(step) < 1.0:
        if cancel is not None and cancel.is_set():
            checkpoint = save(step)
            yield Done(
                checkpoint,
                _summary(step, total, losses, last_val_dice, start, device_text, data, agreement),
                cancelled=True,
            )
            return
        if (
            not rejoined
            and held_out.size
            and settings.validation_rejoin_at is not None
            and progress_at(step) >= settings.validation_rejoin_at
        ):
            labelled_pool = np.union1d(labelled_pool, held_out)
            weights = draw_weights(labelled_pool)
            held_out = np.array([], dtype=np.int64)
            rejoined = True
            yield Notice("The held-out validation slices now join training for the last steps.")
        t0 = time.perf_counter()
        losses, batch, notices = step_with_oom_fallback(
            functools.partial(train_step, step=step), batch, advice=advice
        )
        yield from notices
        step += 1
        step_times.append(time.perf_counter() - t0)
        val_dice = None
        if held_out.size and (step % settings.validate_every == 0 or step == total):
            val_dice = validate()
            last_val_dice = val_dice
        if step % settings.validate_every == 0 or step == total:
            agreement = stream_agreement()
        recent = float(np.mean(step_times[-20:]))
        if job.time_budget_s is not None:
            elapsed = time.perf_counter() - start
            p = progress_at(step)
            total = max(step, min(job.steps, round(step / p) if p > 0 else job.steps))
            eta = max(0.0, min(job.time_budget_s - elapsed, (total - step) * recent))
        else:
            eta = (total - step) * recent
        yield Progress(
            step=step,
            total=total,
            losses={k: v for k, v in losses.items() if k in ("total", "supervised", "cps")},
            val_dice=val_dice,
            eta_s=eta,
            device=device_text,
            memory_mb=memory_mb(device),
            phase="finetune",
            extra={
                **{
                    k: v for k, v in losses.items() if k in ("train_dice", "cps_weight", "cps_kept")
                },
                **({"stream_agreement": agreement} if agreement is not None else {}),
            },
        )
        if time.perf_counter() - last_save >= job.checkpoint_every_s:
            checkpoint = save(step)
            last_save = time.perf_counter()
    total = step
    checkpoint = save(step)
    yield Done(
        checkpoint,
        _summary(step, total, losses, last_val_dice, start, device_text, data, agreement),
    )


def _summary(
    step: int,
    total: int,
    losses: Mapping[str, float],
    val_dice: float | None,
    start: float,
    device: str,
    data: _Prepared,
    agreement: float | None = None,
) -> dict[str, Any]:
    return {
        "stream_agreement": agreement,
        "steps_done": step,
        "steps_planned": total,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_losses": dict(losses),
        "val_dice": val_dice,
        "device": device,
        "slice_axis": data.axis,
        "labelled_slices": _painted_slices(data),
        "empty_slices": [int(i) for i in data.empty],
        "held_out_slices": [int(i) for i in data.held_out],
        "input_size": list(data.input_size),
        "package_version": __version__,
    }
