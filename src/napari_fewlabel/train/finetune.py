"""Fine-tune a two-stream U-Net on a few labelled slices (IDEAL, with measured improvements).

``run(job)`` is a generator of events (:mod:`napari_fewlabel.train.events`):
:class:`Notice` for choices the user should know about, :class:`Progress`
after every step, and one final :class:`Done` with the last checkpoint, also
when cancelled.

The engine in pieces, one module each:

* :mod:`~napari_fewlabel.train.finetune_data`: the job's data checked and laid
  out (labelled, marked-empty and unlabelled slices; with ``planes="all"`` the
  coronal and sagittal slices and their labelled lines);
* :mod:`~napari_fewlabel.train.finetune_batches`: which slices a step sees;
* :mod:`~napari_fewlabel.train.finetune_step`: one step (Dice + CE on the
  labelled voxels, cross pseudo-supervision on the rest, AdamW);
* :mod:`~napari_fewlabel.train.finetune_scores`: the stream agreement and the
  optional held-out Dice;
* this module: the settings, the job, the model card, and :func:`run`, which
  strings them together and writes the checkpoints.

Which of these choices are on by default, and why, is measured in
``docs/engine.md`` / ``docs/benchmarks.md``; :meth:`FinetuneSettings.paper`
gives the settings as published, and the model card records what was used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from napari_fewlabel import __version__
from napari_fewlabel.data.augment import AugmentConfig
from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    check_output_path,
    is_encoder_only,
    load_checkpoint,
    load_encoder_weights,
    load_optimizer_state,
    save_checkpoint,
)
from napari_fewlabel.models.registry import resolve_model
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.convergence import ConvergenceRule, ConvergenceWatch
from napari_fewlabel.train.device import (
    describe_device,
    memory_mb,
    place_network,
    precision_for,
    resolve_device,
)
from napari_fewlabel.train.events import CancelFlag, Done, Event, Notice, Progress
from napari_fewlabel.train.finetune_batches import TrainingBatches, labelled_draw_probabilities
from napari_fewlabel.train.finetune_data import (
    RANDOM_INIT,
    PreparedData,
    painted_slices,
    prepare_data,
    starting_model,
)
from napari_fewlabel.train.finetune_scores import (
    agreement_slices,
    held_out_dice,
    plane_reliability,
    stream_agreement,
)
from napari_fewlabel.train.finetune_step import TrainingStep
from napari_fewlabel.train.preview import PREVIEW_EVERY_S, LivePreview

__all__ = [
    "DEFAULT_STEPS",
    "RANDOM_INIT",
    "BatchSizes",
    "FinetuneJob",
    "FinetuneSettings",
    "labelled_draw_probabilities",
    "run",
    "starting_model",
    "step_with_oom_fallback",
]

#: Default number of steps: about 4-5 minutes on 2 CPU cores for 256x256 slices.
DEFAULT_STEPS = 300

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
    planes : {"auto", "all", "labelled"}
        ``"labelled"`` trains on slices of the labelled plane only, as the
        paper does. ``"all"`` also trains on the two planes across it, whose
        slices carry the labelled slices' lines (every other voxel ignored by
        the loss, :mod:`napari_fewlabel.data.planes`), and prediction averages
        the three planes' probabilities: context across slices from the same
        2D network. ``"auto"`` (the default) is ``"all"`` unless one of two
        or more painted structures is small (under 2 % of the painted slices it is on):
        then the labelled plane only (measured: docs/engine.md).
    labelled_plane_share : float
        With ``planes="all"``, the fraction of steps drawn from the labelled
        plane; the two other planes share the rest.
    stop_when_converged : ConvergenceRule or None
        Once the streams' agreement and the supervised loss have plateaued by
        this rule (:mod:`~napari_fewlabel.train.convergence`), run the rest of
        the schedule faster (twice, by default), so easy scans finish early;
        ``steps`` stays the upper bound (the default rule; measured:
        docs/benchmarks.md). None always does every step, as the paper does.
    class_balance : float
        Exponent of the supervised cross-entropy's class weights at the first
        step, each class weighted by its share of the slice's labelled pixels
        to the power ``-class_balance``
        (:func:`~napari_fewlabel.losses.dice_ce.dice_ce_loss`); it falls
        linearly to 0 (plain cross-entropy) by half-way. 0.5 (the default) lets
        structures of a few hundred voxels a slice learn within a short run; 0
        is the plain cross-entropy of the paper.
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
    planes: Literal["labelled", "all", "auto"] = "auto"
    labelled_plane_share: float = 0.5
    class_balance: float = 0.5
    stop_when_converged: ConvergenceRule | None = field(default_factory=ConvergenceRule)

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
        if self.planes not in ("labelled", "all", "auto"):
            raise FewLabelError(f"planes must be 'auto', 'all' or 'labelled', got {self.planes!r}.")
        if not 0 < self.labelled_plane_share <= 1:
            raise FewLabelError("labelled_plane_share must be in (0, 1].")
        if not 0 <= self.class_balance <= 1:
            raise FewLabelError("class_balance is an exponent in [0, 1]: 0.5 is the default.")
        if not 0 < self.empty_share <= 1:
            raise FewLabelError(
                "empty_share is a fraction of the labelled draws: give a value in (0, 1]."
            )

    @classmethod
    def paper(cls) -> FinetuneSettings:
        """IDEAL as published: CPS from the first step under a sigmoid ramp, every pseudo-label,
        one view, slices of the labelled plane only, unweighted cross-entropy."""
        return cls(
            supervised_warmup=0.0,
            cps_rampup=0.4,
            confidence_threshold=0.0,
            strong_view=False,
            planes="labelled",
            class_balance=0.0,
            stop_when_converged=None,
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
        kwargs.setdefault("stop_when_converged", None)  # cards from before the rule: none
        if isinstance(kwargs.get("stop_when_converged"), Mapping):
            kwargs["stop_when_converged"] = ConvergenceRule(**kwargs["stop_when_converged"])
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
        if self.planes != "labelled":
            out.append(
                f"planes={self.planes}: also trained on the two planes across the labelled "
                "slices (their labelled lines), prediction averaged over three planes"
                + (
                    " unless one of several painted structures is small"
                    if self.planes == "auto"
                    else ""
                )
            )
        if self.class_balance > 0:
            out.append(
                f"cross-entropy weighted by class share^-{self.class_balance:g} per slice, "
                "fading to plain by half-way (small structures learn early)"
            )
        if self.test_time_flips:
            out.append("flip test-time augmentation")
        if self.encoder_frozen_for > 0:
            out.append(
                f"a trained encoder frozen for the first {self.encoder_frozen_for:.0%} of steps"
            )
        if self.stop_when_converged is not None:
            out.append(
                f"the rest of the schedule runs {self.stop_when_converged.speedup:g}x faster "
                "once the streams' agreement and the loss have plateaued"
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
    preview_every_s : float
        Seconds between live previews when the run's ``cancel`` flag says
        which slice is on screen (a :class:`~.control.JobControl`; see
        :mod:`~.preview`); 0: after every step.
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
    preview_every_s: float = PREVIEW_EVERY_S


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


@dataclass
class _Start:
    """The network training starts from, and where it stands."""

    network: TwoStreamUNet
    started_from: str
    steps_done: int = 0
    optimizer_state: dict[str, Any] | None = None
    notice: Notice | None = None


def _start_network(job: FinetuneJob, data: PreparedData) -> _Start:
    """A random network, the job's start (encoder or all weights), or the run to resume."""
    network = TwoStreamUNet(data.architecture)
    if job.resume_from is not None:
        resumed = load_checkpoint(resolve_model(job.resume_from))
        if resumed.card.classes != data.classes:
            raise FewLabelError(
                "The checkpoint to resume has other classes than this job: resume with the "
                "same labels and classes, or start a new run with --model."
            )
        network.load_state_dict(resumed.network.state_dict())
        step0 = int(resumed.card.training.get("steps_done", 0))
        return _Start(
            network,
            str(resumed.card.training.get("started_from", RANDOM_START)),
            step0,
            load_optimizer_state(resolve_model(job.resume_from)),
            Notice(f"Resuming from {Path(job.resume_from).name} at step {step0}."),
        )
    if data.start is None:
        return _Start(network, RANDOM_START)
    path = resolve_model(data.start)
    name = Path(data.start).name if job.model is None else str(job.model)
    assert data.start_card is not None
    if not is_encoder_only(data.start_card) and data.start_card.classes == data.classes:
        network.load_state_dict(load_checkpoint(path).network.state_dict())
        started_from = f"{name} (all weights)"
    else:
        load_encoder_weights(network, path)
        started_from = f"{name} (encoder)"
    return _Start(network, started_from, notice=Notice(f"Starting from {started_from}."))


def _model_card(
    job: FinetuneJob,
    data: PreparedData,
    *,
    use_cps: bool,
    started_from: str,
    steps_done: int,
    steps_planned: int,
    val_dice: float | None,
    device: str,
    precision: str,
    train_seconds: float,
    plane_weights: list[float],
    converged: str | None = None,
) -> ModelCard:
    """The card saved with every checkpoint: what the model is and how it was trained."""
    settings, in_slices = job.settings, data.architecture.in_slices
    method = (
        "IDEAL two-stream fine-tuning: Dice+CE on labelled slices, cross "
        "pseudo-supervision on unlabelled slices"
        if use_cps
        else "two-stream supervised fine-tuning: Dice+CE on labelled slices"
    )
    if data.cross_planes:
        method += (
            "; tri-planar: coronal and sagittal slices trained on the labelled slices' "
            "lines, the three planes averaged at prediction"
        )
    return ModelCard(
        architecture=data.architecture.to_dict(),
        classes=data.classes,
        modality=job.image.modality,
        normalization=data.normalization,
        input_size=data.input_size,
        slice_axis=data.axis,
        training={
            "method": method,
            "paper_faithful": not settings.differences_from_paper(in_slices) and use_cps,
            "differences_from_paper": settings.differences_from_paper(in_slices),
            "settings": settings.to_dict(),
            "data": {
                "image_shape": list(job.image.shape),
                "spacing_mm": list(job.image.spacing_mm),
                "modality": job.image.modality,
                "slice_axis": data.axis,
                "labelled_slices": painted_slices(data),
                "empty_slices": [int(i) for i in data.empty],
                "held_out_slices": [int(i) for i in data.held_out],
                "unlabelled_slices": len(data.unlabelled_pool),
                "extra_unlabelled_volumes": len(job.extra_unlabelled),
                "extra_labelled_volumes": len(job.extra_labelled),
                "source": str(job.image.header.get("path", "in memory")),
            },
            "started_from": started_from,
            "steps_done": steps_done,
            "steps_planned": steps_planned,
            "seed": job.seed,
            "val_dice": val_dice,
            "device": device,
            "precision": precision,
            "train_seconds": round(train_seconds, 1),
            "converged": converged,
        },
        inference={
            "test_time_flips": settings.test_time_flips,
            "planes": [data.axis, *(p.axis for p in data.cross_planes)],
            "plane_weights": [round(w, 4) for w in plane_weights],
            "plane_max_side": data.plane_max_side,
        },
    )


class _Clock:
    """Progress through the run: by steps, or by elapsed time under a time budget.

    After :meth:`hurry` (the run converged) progress advances ``speedup`` times
    faster a step, so the rest of the schedule takes fewer steps.
    """

    def __init__(self, steps: int, budget_s: float | None) -> None:
        self.steps = steps
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self._hurried: tuple[int, float, float] | None = None  # (step, progress, speedup)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _by_steps(self, step: int) -> float:
        if self._hurried is None:
            return step / self.steps
        at, p0, speedup = self._hurried
        return p0 + (step - at) * speedup / self.steps

    def progress(self, step: int) -> float:
        p = self._by_steps(step)
        if self.budget_s is not None:
            p = max(p, self.elapsed() / self.budget_s)
        return min(1.0, p)

    def hurry(self, step: int, speedup: float) -> int:
        """Run the rest ``speedup`` times faster from ``step``; returns the steps saved."""
        before = self._planned()
        self._hurried = (step, self.progress(step), speedup)
        return before - self._planned()

    def _planned(self) -> int:
        """The step at which progress by steps reaches 1."""
        if self._hurried is None:
            return self.steps
        at, p0, speedup = self._hurried
        return at + math.ceil(round((1 - p0) * self.steps / speedup, 6))

    def total_and_eta(self, step: int, seconds_per_step: float) -> tuple[int, float]:
        """The steps the run will do and the seconds left."""
        planned = self._planned()
        if self.budget_s is None:
            return planned, (planned - step) * seconds_per_step
        p = self.progress(step)
        total = max(step, min(planned, round(step / p) if p > 0 else planned))
        eta = max(0.0, min(self.budget_s - self.elapsed(), (total - step) * seconds_per_step))
        return total, eta


def run(job: FinetuneJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Fine-tune on ``job``; yields Notice/Progress events and one final Done.

    The pieces, each readable on its own: :func:`~.finetune_data.prepare_data`
    (checks and lays out the data), :class:`~.finetune_batches.TrainingBatches`
    (which slices a step sees), :class:`~.finetune_step.TrainingStep` (losses
    and update), :mod:`~.finetune_scores` (validation), :func:`_model_card`
    and :func:`~napari_fewlabel.models.checkpoint.save_checkpoint` (checkpoints).

    Parameters
    ----------
    job : FinetuneJob
    cancel : CancelFlag, optional
        Checked between steps; when set, the current weights are saved and
        ``Done(cancelled=True)`` is yielded. A :class:`~.control.JobControl`
        also says which slice is on screen: the run then yields
        :class:`~.events.Preview` events of it (:mod:`~.preview`).

    Raises
    ------
    FewLabelError
        For any problem with the inputs (raised before training starts) or a
        GPU that runs out of memory at batch size 1.
    """
    out = check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    data = prepare_data(job)
    yield from data.notices

    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    device = resolve_device(job.device)
    device_text = describe_device(device)
    precision = precision_for(device)
    settings = job.settings
    use_cps = settings.unlabelled_loss == "cps" and bool(data.unlabelled_pool)

    begin = _start_network(job, data)
    if begin.notice is not None:
        yield begin.notice
    network = place_network(begin.network, device).train()
    optimizer = torch.optim.AdamW(
        _parameter_groups(network, settings, begin.started_from != RANDOM_START),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    if begin.optimizer_state is not None:
        optimizer.load_state_dict(begin.optimizer_state)
    batches = TrainingBatches(data, job.seed, settings.empty_share, settings.labelled_plane_share)
    train_step = TrainingStep(
        network, optimizer, settings, batches,
        use_cps=use_cps, trained_start=begin.started_from != RANDOM_START,
        generator=generator, device=device, precision=precision,
    )  # fmt: skip
    sizes = BatchSizes(settings.batch_labelled, settings.batch_unlabelled)
    agreement_on = agreement_slices(data.unlabelled_pool)
    num_classes = len(data.classes)
    clock = _Clock(job.steps, job.time_budget_s)
    rule = settings.stop_when_converged
    watch = ConvergenceWatch(rule) if rule is not None else None
    converged = ""
    val_dice: float | None = None
    last_val_dice: float | None = None
    agreement: float | None = None
    losses: dict[str, float] = {}
    total = job.steps
    last_save = clock.start
    step_times: list[float] = []
    advice = (
        f"The input is {data.input_size[0]}x{data.input_size[1]}: use a smaller --max-input-side, "
        "close other programs using the GPU, or train on the CPU with --device cpu."
    )

    def save(steps_done: int) -> Path:
        weights = [1.0]
        if data.cross_planes:  # how far each plane has learnt its labels: prediction's weights
            weights = plane_reliability(
                network, data.stacks[0], batches.labelled_pool, data.labels_by_slice,
                data.cross_planes, num_classes, device, precision,
            )  # fmt: skip
        card = _model_card(
            job, data, use_cps=use_cps, started_from=begin.started_from,
            steps_done=steps_done, steps_planned=total, val_dice=last_val_dice,
            device=device_text, precision=precision.name, train_seconds=clock.elapsed(),
            plane_weights=weights, converged=converged or None,
        )  # fmt: skip
        network.eval()
        path = save_checkpoint(out, network, card, optimizer=optimizer)
        network.train()
        return path

    def summary(step: int) -> dict[str, Any]:
        return _summary(
            step, total, losses, last_val_dice, clock.start, device_text, data, agreement
        )

    marked = f" ({data.empty.size} of them marked empty)" if data.empty.size else ""
    yield Notice(
        f"Fine-tuning on {device_text} ({precision.name}): "
        f"{len(batches.labelled_pool) + len(data.extra_labelled)} labelled "
        f"slice(s) for training{marked}, {batches.held_out.size} held out for validation, "
        f"{len(data.unlabelled_pool)} unlabelled slice(s), input "
        f"{data.input_size[0]}x{data.input_size[1]}, {total} steps."
    )
    preview = LivePreview.for_control(cancel, data, job.preview_every_s)
    step = begin.steps_done
    if step >= total:
        yield Notice(f"The checkpoint has already done {step} of {total} steps: nothing to train.")
    while step < total and clock.progress(step) < 1.0:
        if cancel is not None and cancel.is_set():
            yield Done(save(step), summary(step), cancelled=True)
            return
        if (
            batches.held_out.size
            and settings.validation_rejoin_at is not None
            and clock.progress(step) >= settings.validation_rejoin_at
        ):
            batches.rejoin_held_out()
            yield Notice("The held-out validation slices now join training for the last steps.")
        t0 = time.perf_counter()
        progress = clock.progress(step)

        def one_step(b: BatchSizes, step: int = step, p: float = progress) -> dict[str, float]:
            return train_step(b.labelled, b.unlabelled, step, p)

        losses, sizes, notices = step_with_oom_fallback(one_step, sizes, advice=advice)
        yield from notices
        step += 1
        step_times.append(time.perf_counter() - t0)
        val_dice = None
        scoring = step % settings.validate_every == 0 or step == total
        if scoring and batches.held_out.size:
            val_dice = last_val_dice = held_out_dice(
                network, data.stacks[0], batches.held_out, data.labels_by_slice,
                num_classes, device, precision,
            )  # fmt: skip
        if scoring:
            agreement = stream_agreement(
                network, data.stacks[0], agreement_on, num_classes, device, precision
            )
        if watch is not None and rule is not None and "supervised" in losses:
            watch.add_loss(losses["supervised"])
            reason = watch.check(agreement, clock.progress(step)) if scoring else None
            if reason is not None:
                saved = clock.hurry(step, rule.speedup)
                converged = f"{reason} (step {step}): finishing {saved} steps early"
                yield Notice(converged[0].upper() + converged[1:] + ".")
        total, eta = clock.total_and_eta(step, float(np.mean(step_times[-20:])))
        yield Progress(
            step=step,
            total=total,
            losses={k: v for k, v in losses.items() if k in ("total", "supervised", "cps")},
            val_dice=val_dice,
            eta_s=eta,
            device=device_text,
            memory_mb=memory_mb(device),
            phase="finetune",
            note="converged: finishing early" if converged else "",
            extra={
                **{
                    k: v for k, v in losses.items() if k in ("train_dice", "cps_weight", "cps_kept")
                },
                **({"stream_agreement": agreement} if agreement is not None else {}),
            },
        )
        if preview is not None:
            yield from preview.maybe(network, step, device, precision)
        if time.perf_counter() - last_save >= job.checkpoint_every_s:
            save(step)
            last_save = time.perf_counter()
    total = step
    yield Done(save(step), {**summary(step), "converged": converged or None})


def _summary(
    step: int,
    total: int,
    losses: Mapping[str, float],
    val_dice: float | None,
    start: float,
    device: str,
    data: PreparedData,
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
        "labelled_slices": painted_slices(data),
        "empty_slices": [int(i) for i in data.empty],
        "held_out_slices": [int(i) for i in data.held_out],
        "input_size": list(data.input_size),
        "package_version": __version__,
    }
