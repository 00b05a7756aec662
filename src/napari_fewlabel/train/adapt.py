"""Adapt an MRI segmentation model to CT without CT labels (Dou et al., IJCAI 2018).

"Unsupervised cross-modality domain adaptation of ConvNets for biomedical
image segmentations with adversarial loss": the source (MRI) model stays as
it is; a *domain adaptation module* (DAM), a trainable copy of the source's
first ``d`` encoder stages, replaces them for CT; everything above (the
deeper encoder stages and both decoders) is frozen and shared. A *domain
critic* (:class:`~napari_fewlabel.models.critic.DomainCritic`) reads
multi-level features and the logits of a slice and is trained to tell MRI
from CT with a Wasserstein objective; the DAM is trained to fool it. No CT
label is used.

One step (a *joint update*)
---------------------------
* ``critic_updates`` (20) critic updates, each on a fresh batch of MRI slices
  (through the source network) and CT slices (through the DAM + shared
  layers): minimise ``mean D(ct) - mean D(mr)``, then clip every critic
  weight to ``+-clip`` (0.03) -- or, with ``objective="gp"``, add a gradient
  penalty instead of clipping (WGAN-GP).
* one DAM update on a CT batch: minimise ``-mean D(ct)``, i.e. move the CT
  features toward where the critic puts MRI.
* the first ``warmup_steps`` joint updates train the critic only (DAM frozen),
  so the DAM starts against a critic that already measures the gap.
* RMSProp, learning rate 3e-4 for both, times 0.98 every 100 joint updates.

``Progress.losses`` carries ``wasserstein`` (the critic's estimate
``mean D(mr) - mean D(ct)`` on the last critic batch) and ``dam`` (the DAM
loss, ``-mean D(ct)``; absent during the warm-up).

Where the paper leaves room (our choices, recorded in the model card)
----------------------------------------------------------------------
* ``d``: the reference implementation adapts the whole down-sampling path of
  its segmenter (groups 1-6 of 10) and shares the higher layers and the
  classifier. The analogue in our U-Net is the whole encoder with both
  decoders shared: ``dam_stages=None`` means all encoder stages. Because the
  decoders read the encoder through skip connections, every adapted stage
  also feeds a decoder level directly.
* Intensities: the published pipeline normalised every volume, MRI and CT
  alike, to zero mean and unit variance. Here CT goes into the DAM the CT
  way -- clipped to a Hounsfield window and scaled to [-1, 1] -- which is
  what the adapted model (an ordinary CT model) then uses at prediction, and
  MRI goes through the source model's own normalisation. The DAM's first
  convolution absorbs the difference in scale. ``target_normalization=
  "percentile_zscore"`` gives the paper's choice instead.
* The critic sees every encoder stage below the full-resolution stem and the
  logits of both decoder streams, resized to a quarter of the input size.
* No L2 weight decay and no second (mask) critic: those belong to the
  journal extension (PnP-AdaNet), not to the IJCAI method.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from napari_fewlabel import __version__
from napari_fewlabel.data.normalization import NormalizationConfig, count_nonfinite, fit_intensity
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.data.slices import labelled_slices
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    check_output_path,
    load_checkpoint,
    load_optimizer_state,
    read_card,
    read_model_tensors,
    save_checkpoint,
    state_path,
)
from napari_fewlabel.models.critic import DomainCritic, gradient_penalty, resize_to
from napari_fewlabel.models.registry import resolve_model
from napari_fewlabel.models.unet2d import TwoStreamUNet
from napari_fewlabel.train.adapt_check import (
    HIGHER_IS_BETTER,
    CheckReference,
    class_proportions,
    label_free_scores,
    predicted_labels,
    quality,
)
from napari_fewlabel.train.adapt_region import (
    PREDICTION_TRIM,
    Box,
    CriticRegion,
    box_foreground,
    crop_maps,
    labelled_foreground,
    predicted_foreground,
    region_of,
)
from napari_fewlabel.train.device import (
    Precision,
    autocast,
    describe_device,
    memory_mb,
    precision_for,
    resolve_device,
)
from napari_fewlabel.train.events import CancelFlag, Done, Event, Notice, Progress

#: Default number of joint updates (warm-up included).
DEFAULT_STEPS = 300
#: Critic updates per DAM update with the gradient penalty (WGAN-GP's n_critic = 5).
GP_CRITIC_UPDATES = 5
#: The label-free check that picks the checkpoint to keep (docs/adaptation.md: how it was chosen).
DEFAULT_CHECK = "stream_agreement"
#: What adaptation says when no checkpoint beats its start by the check.
NO_IMPROVEMENT = "no improvement found: the MRI model applied with the HU window is kept"
#: Cross-entropy class balance on painted CT slices (fine-tuning's default).
SUPERVISED_CLASS_BALANCE = 0.5


@dataclass(frozen=True)
class AdaptSettings:
    """How to adapt; the defaults follow the paper where it says.

    Attributes
    ----------
    dam_stages : int or None
        Encoder stages copied into the DAM (1 = the full-resolution stem only;
        stage ``i >= 1`` ends at ``1 / 2**i`` resolution). None: all of them
        (the reference implementation's setting, see the module docstring).
    critic_updates : int
        Critic updates per DAM update (20 in the paper).
    warmup_steps : int
        Joint updates at the start that train only the critic (DAM frozen).
    learning_rate : float
        RMSProp learning rate of the critic and the DAM (3e-4).
    lr_decay, lr_decay_every : float, int
        The learning rate is multiplied by ``lr_decay`` every ``lr_decay_every``
        joint updates (0.98 per 100).
    objective : {"clip", "gp"}
        Wasserstein critic kept Lipschitz by weight clipping (paper) or by a
        gradient penalty (WGAN-GP).
    clip : float
        Weight-clipping bound (0.03).
    gp_weight : float
        Gradient-penalty weight for ``objective="gp"``.
    batch_size : int
        Slices per domain in each update.
    critic_width : int
        Channels of the critic's convolutions.
    critic_resolution_divisor : int
        The critic sees its inputs at ``input size / this``.
    target_normalization : {"ct_window", "percentile_zscore"}
        How CT is normalised for the DAM (and by the adapted model).
    ct_window_hu : tuple of float
        HU window for ``"ct_window"``.
    check : str
        The label-free check (:mod:`napari_fewlabel.train.adapt_check`) that
        picks the checkpoint to keep: the start (the MRI model fed the
        HU-windowed CT) and every ``check_every`` joint updates are scored, and
        the best is written; when none beats the start, the start is.
        ``"last"``: keep the last checkpoint, whatever the check says.
    check_margin : float
        A checkpoint replaces the kept one (the start, at first) only when its
        check is better by more than this: on the real head pair the stream
        agreement of a worse checkpoint came within 0.0002 of the start's.
    check_every : int
        Joint updates between checks (0: no check, keep the last).
    check_slices : int
        Target slices (evenly spaced over the CT scans) every check scores.
    supervised_weight : float
        Weight of the Dice + cross-entropy on painted CT slices (only with
        ``AdaptJob.target_labels``) in each DAM update.
    critic_region : {"whole", "anatomy"}
        What the critic sees: whole slices, or only the slices and in-plane box
        around the anatomy in each domain (:mod:`~napari_fewlabel.train.adapt_region`;
        from ``AdaptJob.source_labels`` / ``target_box``, else the source
        model's prediction), as the paper's crops do.
    region_margin : float
        With ``"anatomy"``: the region grows by this fraction of its extent on
        each side.
    """

    dam_stages: int | None = None
    critic_updates: int = 20
    warmup_steps: int = 20
    learning_rate: float = 3e-4
    lr_decay: float = 0.98
    lr_decay_every: int = 100
    objective: Literal["clip", "gp"] = "clip"
    clip: float = 0.03
    gp_weight: float = 10.0
    batch_size: int = 4
    critic_width: int = 64
    critic_resolution_divisor: int = 4
    target_normalization: Literal["ct_window", "percentile_zscore"] = "ct_window"
    ct_window_hu: tuple[float, float] = (-300.0, 400.0)
    check: str = DEFAULT_CHECK
    check_margin: float = 0.01
    check_every: int = 25
    check_slices: int = 32
    supervised_weight: float = 1.0
    critic_region: Literal["whole", "anatomy"] = "whole"
    region_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.check != "last" and self.check not in HIGHER_IS_BETTER:
            raise FewLabelError(
                f"check must be 'last' or one of {', '.join(HIGHER_IS_BETTER)}, got {self.check!r}."
            )
        if self.check_every < 0 or self.check_slices < 1 or self.check_margin < 0:
            raise FewLabelError(
                "check_every and check_margin must be >= 0 and check_slices at least 1."
            )
        if self.critic_region not in ("whole", "anatomy"):
            raise FewLabelError(
                f"critic_region must be 'whole' or 'anatomy', got {self.critic_region!r}."
            )
        if not 0 <= self.region_margin <= 1:
            raise FewLabelError(f"region_margin must be in 0..1, got {self.region_margin}.")
        if self.supervised_weight < 0:
            raise FewLabelError(f"supervised_weight must be >= 0, got {self.supervised_weight}.")
        if self.dam_stages is not None and self.dam_stages < 1:
            raise FewLabelError(f"dam_stages must be at least 1, got {self.dam_stages}.")
        if self.critic_updates < 1 or self.batch_size < 1:
            raise FewLabelError("critic_updates and batch_size must be at least 1.")
        if self.warmup_steps < 0:
            raise FewLabelError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.objective not in ("clip", "gp"):
            raise FewLabelError(f"objective must be 'clip' or 'gp', got {self.objective!r}.")
        if self.objective == "clip" and not self.clip > 0:
            raise FewLabelError(f"clip must be positive, got {self.clip}.")
        if self.target_normalization not in ("ct_window", "percentile_zscore"):
            raise FewLabelError(
                "target_normalization must be 'ct_window' or 'percentile_zscore', "
                f"got {self.target_normalization!r}."
            )

    @classmethod
    def wgan_gp(cls, **changes: Any) -> AdaptSettings:
        """WGAN-GP as Gulrajani et al. (2017) run it: gradient penalty, 5 critic updates per DAM update.

        Not the paper's setting, but the one that meets the +0.2 Dice goal on
        the phantom pair (docs/adaptation.md); ``changes`` override fields.
        """
        return cls(**{"objective": "gp", "critic_updates": GP_CRITIC_UPDATES, **changes})

    @classmethod
    def for_objective(cls, objective: Literal["clip", "gp"], **changes: Any) -> AdaptSettings:
        """The paper's settings for ``"clip"``, :meth:`wgan_gp` for ``"gp"``; ``changes`` override."""
        return cls.wgan_gp(**changes) if objective == "gp" else cls(objective=objective, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def normalization(self) -> NormalizationConfig:
        """The normalisation of CT slices into the DAM (and of the adapted model)."""
        if self.target_normalization == "ct_window":
            return NormalizationConfig("ct_window", window_hu=self.ct_window_hu)
        return NormalizationConfig("percentile_zscore")


@dataclass(frozen=True)
class AdaptJob:
    """Everything an adaptation run needs.

    Attributes
    ----------
    source_model : str or Path
        The MRI segmentation model (registry name or ``.safetensors`` path).
    target : tuple of Volume
        Unlabelled CT scans, ``(z, y, x)`` in HU.
    out : Path
        The adapted model (``.safetensors``); the training state (critic and
        optimizer, for ``resume_from``) goes next to it as
        ``<stem>.state.safetensors``. Both are rewritten atomically.
    source : tuple of Volume
        MRI scans of the kind the source model was trained on (labels are not
        needed). Default: the scan named in the source model's card, when
        that file still exists.
    resume_from : Path, optional
        An adapted model written by an earlier run of this job (its state
        file must be next to it); continues the step count.
    steps : int
        Joint updates, warm-up included.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    seed : int
    settings : AdaptSettings
    checkpoint_every_s : float
        Seconds between intermediate checkpoints.
    target_labels : Volume, optional
        A few painted slices of the first target scan (same grid; integer
        class indices of the source model's classes, a slice along the
        model's slice axis with any nonzero voxel counts as labelled, 0 there
        is background, all-zero slices are unlabelled). Their Dice +
        cross-entropy joins every DAM update.
    checkpoints_dir : Path, optional
        Also write every checked checkpoint there, ``step_<N>.safetensors``
        (``step_0`` is the start), to inspect or score them.
    source_labels : Volume, optional
        With ``settings.critic_region="anatomy"``: labels on the first MRI
        scan's grid (e.g. the source model's training labels); the critic's
        MRI region is around their nonzero voxels. Default: the source model's
        prediction.
    target_box : ((z0, z1), (y0, y1), (x0, x1)), optional
        With ``"anatomy"``: the critic's region on the first CT scan, in voxels
        (ends excluded). Default: the source model's prediction through the HU
        window (the adaptation's start).
    """

    source_model: str | Path
    target: tuple[Volume, ...]
    out: Path
    source: tuple[Volume, ...] = ()
    resume_from: Path | None = None
    steps: int = DEFAULT_STEPS
    device: str = "auto"
    seed: int = 0
    settings: AdaptSettings = field(default_factory=AdaptSettings)
    checkpoint_every_s: float = 60.0
    target_labels: Volume | None = None
    checkpoints_dir: Path | None = None
    source_labels: Volume | None = None
    target_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None


# ------------------------------------------------------------------ network
def encoder_stage_count(network: TwoStreamUNet) -> int:
    """Stages of the encoder: the full-resolution stem, then one per level."""
    return len(network.encoder.levels) + 1


def dam_prefixes(dam_stages: int) -> tuple[str, ...]:
    """State-dict prefixes of the layers in a DAM of ``dam_stages`` stages.

    Stage 0 is ``encoder.stem``, stage 1 ``encoder.down`` + ``encoder.levels.0``
    and stage ``i > 1`` ``encoder.levels.{i-1}``.
    """
    prefixes = ["encoder.stem."]
    if dam_stages > 1:
        prefixes.append("encoder.down.")
    prefixes += [f"encoder.levels.{j}." for j in range(dam_stages - 1)]
    return tuple(prefixes)


def plug_in_dam(source: TwoStreamUNet, dam_stages: int) -> TwoStreamUNet:
    """The target network: a trainable copy of the first ``dam_stages`` stages, the rest shared.

    The returned network holds *the same module objects* as ``source`` for
    every layer above the DAM (deeper encoder levels, both decoders), so they
    cannot drift apart; their parameters are frozen (``requires_grad=False``)
    in both. Only the DAM's parameters require gradients.
    """
    n = encoder_stage_count(source)
    if not 1 <= dam_stages <= n:
        raise FewLabelError(
            f"The source network has {n} encoder stages: choose dam_stages between 1 and {n}."
        )
    for p in source.parameters():
        p.requires_grad_(False)
    target = copy.deepcopy(source)
    target.decoder_a = source.decoder_a
    target.decoder_b = source.decoder_b
    for j in range(dam_stages - 1, len(source.encoder.levels)):
        target.encoder.levels[j] = source.encoder.levels[j]
    if dam_stages < 2:
        target.encoder.down = source.encoder.down
    shared = {id(p) for p in source.parameters()}
    for p in target.parameters():
        if id(p) not in shared:
            p.requires_grad_(True)
    return target


def dam_parameters(target: TwoStreamUNet) -> list[nn.Parameter]:
    """The trainable (DAM) parameters of a network from :func:`plug_in_dam`."""
    return [p for p in target.parameters() if p.requires_grad]


def critic_inputs(
    network: TwoStreamUNet,
    x: torch.Tensor,
    divisor: int,
    boxes: Sequence[Box] | None = None,
) -> list[torch.Tensor]:
    """Multi-level features and both streams' logits of ``x``, at ``input size / divisor``.

    Returns the encoder's feature maps below the full-resolution stem and the
    logits of decoders A and B, each ``(B, C_i, H / divisor, W / divisor)``;
    with ``boxes`` (one per sample), each map is first cut to its sample's box.
    """
    features = network.encoder(x)
    logits = [network.decoder_a(features), network.decoder_b(features)]
    size = (max(1, x.shape[-2] // divisor), max(1, x.shape[-1] // divisor))
    maps = [*features[1:], *logits]
    return resize_to(maps, size) if boxes is None else crop_maps(maps, boxes, size)


# ------------------------------------------------------------------ data
def _stacks(
    volumes: tuple[Volume, ...],
    config: NormalizationConfig,
    axis: int,
    size: tuple[int, int],
    what: str,
) -> list[SliceStack]:
    stacks = []
    for i, volume in enumerate(volumes):
        if volume.array.ndim != 3:
            raise FewLabelError(f"{what} scan {i + 1} is not a 3D volume: give (z, y, x) scans.")
        if count_nonfinite(volume.array) == volume.array.size:
            raise FewLabelError(
                f"{what} scan {i + 1} is all NaN or Inf: check the file or drop it."
            )
        stacks.append(SliceStack(volume.array, axis, fit_intensity(volume.array, config), size))
    return stacks


def _source_volumes(job: AdaptJob, card: ModelCard) -> tuple[tuple[Volume, ...], list[Notice]]:
    if job.source:
        return job.source, []
    recorded = card.training.get("data", {}).get("source")
    if recorded and Path(recorded).is_file():
        from napari_fewlabel.io import load_volume

        return (load_volume(recorded),), [
            Notice(f"Using the source model's training scan {recorded} as the MRI side.")
        ]
    raise FewLabelError(
        "Adaptation needs MRI scans of the kind the source model was trained on (labels are "
        "not needed): give them with --source (the scan named in the model card is not there)."
    )


def _check_inputs(job: AdaptJob) -> None:
    check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    if not job.target:
        raise FewLabelError("Give at least one CT scan to adapt to (--target).")
    if job.settings.critic_region == "whole" and (
        job.source_labels is not None or job.target_box is not None
    ):
        raise FewLabelError(
            "MRI labels or a CT box set the critic's region: use critic_region='anatomy' "
            "(--critic-region anatomy), or leave them out."
        )
    for i, volume in enumerate(job.target):
        if volume.modality == "MR":
            raise FewLabelError(
                f"Target scan {i + 1} is marked as MR: adaptation goes from MRI to CT, so give CT "
                "scans in Hounsfield units as --target."
            )


def _painted_slices(
    job: AdaptJob, card: ModelCard, stack: SliceStack, in_slices: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
    """Windows ``(m, in_slices, H, W)`` and labels ``(m, H, W)`` of the painted target slices.

    Returns None without ``job.target_labels``; also the painted slice indices.
    """
    if job.target_labels is None:
        return None
    labels = job.target_labels.array
    ct_shape = job.target[0].array.shape
    if labels.shape != ct_shape:
        raise FewLabelError(
            f"The CT labels are {labels.shape} voxels but the first CT scan is {ct_shape}: paint "
            "them on the first target scan's grid (e.g. save the Labels layer drawn on it)."
        )
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise FewLabelError("The CT labels hold fractions: give an integer label map.")
    k = len(card.classes)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        raise FewLabelError(
            f"The CT labels hold values {low}..{high}, but the model has {k} classes "
            f"({', '.join(card.class_names)}): paint with labels 0..{k - 1}."
        )
    axis = card.slice_axis
    painted = labelled_slices(labels, axis)
    if painted.size == 0:
        raise FewLabelError(
            f"The CT labels have no painted slice along axis {axis} (the model's slice axis): "
            "paint one or two slices, or leave the labels out."
        )
    windows = stack.windows(torch.from_numpy(painted.astype(np.int64)), in_slices)
    targets = fit_labels(labels.astype(np.int64), axis, painted, stack.fit)
    return windows, targets, painted


def _evenly_spaced_windows(stacks: list[SliceStack], count: int, in_slices: int) -> torch.Tensor:
    """``count`` windows spread evenly over all slices of ``stacks`` (fewer if there are fewer)."""
    sizes = [len(st) for st in stacks]
    total = sum(sizes)
    picks = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
    offsets = np.cumsum([0, *sizes])
    windows = []
    for i, stack in enumerate(stacks):
        mine = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if mine.size:
            windows.append(stack.windows(torch.from_numpy(mine.astype(np.int64)), in_slices))
    return torch.cat(windows)


def _critic_regions(
    job: AdaptJob,
    network: TwoStreamUNet,
    stacks: tuple[list[SliceStack], list[SliceStack]],
    source_shape: tuple[int, ...],
    axis: int,
    in_slices: int,
    device: torch.device,
    precision: Precision,
) -> tuple[list[CriticRegion], list[CriticRegion], list[Notice]]:
    """The MRI and CT regions the critic sees, and Notices saying where they came from."""
    source_stacks, target_stacks = stacks
    if job.settings.critic_region == "whole":
        return (
            [CriticRegion.whole(st) for st in source_stacks],
            [CriticRegion.whole(st) for st in target_stacks],
            [],
        )
    margin = job.settings.region_margin
    notices: list[Notice] = []

    def regions(side: str, given: torch.Tensor | None, given_how: str) -> list[CriticRegion]:
        out = []
        for i, stack in enumerate(source_stacks if side == "MRI" else target_stacks):
            if i == 0 and given is not None:
                mask, how, trim = given, given_how, 0.0
            else:
                mask = predicted_foreground(network, stack, in_slices, device, precision)
                how, trim = "the source model's prediction", PREDICTION_TRIM
            region = region_of(mask, margin, trim)
            if region is None:
                if i == 0 and given is not None:
                    raise FewLabelError(
                        f"The {given_how} on {side} scan 1 hold no voxel: give labels or a box "
                        "around the anatomy, or use the whole slices (critic_region='whole')."
                    )
                notices.append(
                    Notice(
                        f"The source model finds no foreground on {side} scan {i + 1}: the "
                        "critic sees its whole slices.",
                        level="warning",
                    )
                )
                region = CriticRegion.whole(stack)
            else:
                top, left, bottom, right = region.box
                notices.append(
                    Notice(
                        f"The critic sees slices {region.first}-{region.last} of {side} scan "
                        f"{i + 1} and {100 * (bottom - top):.0f}% x {100 * (right - left):.0f}% "
                        f"of each slice (from {how})."
                    )
                )
            out.append(region)
        return out

    source_mask = (
        None
        if job.source_labels is None
        else labelled_foreground(
            job.source_labels.array, source_shape, axis, source_stacks[0], "MRI labels"
        )
    )
    target_mask = (
        None
        if job.target_box is None
        else box_foreground(job.target_box, job.target[0].array.shape, axis, target_stacks[0])
    )
    return (
        regions("MRI", source_mask, "MRI labels"),
        regions("CT", target_mask, "CT box"),
        notices,
    )


def _dam_state(network: TwoStreamUNet, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A copy of the DAM's weights (the layers under ``prefixes``)."""
    return {
        k: v.detach().clone() for k, v in network.state_dict().items() if k.startswith(prefixes)
    }


# ------------------------------------------------------------------ run
def run(job: AdaptJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Adapt ``job.source_model`` to the CT scans of ``job``; yields Notice/Progress and one Done.

    The model written is the best of the start and the checked checkpoints by
    ``settings.check`` (:mod:`~napari_fewlabel.train.adapt_check`), or the last
    one with ``check="last"`` or ``check_every=0``; when no checkpoint beats
    the start, the start (the MRI model with the CT normalisation) is written
    and a Notice, the Done summary and the model card say so. The training
    state next to it always holds the *last* weights, so ``resume_from``
    continues the run where it stopped.

    Parameters
    ----------
    job : AdaptJob
    cancel : CancelFlag, optional
        Checked between joint updates; when set, the adapted model and the
        training state are saved and ``Done(cancelled=True)`` is yielded.

    Raises
    ------
    FewLabelError
        For any problem with the inputs, raised before training starts.
    """
    _check_inputs(job)
    settings = job.settings
    source_path = resolve_model(job.source_model)
    source_model = load_checkpoint(source_path)
    card = source_model.card
    if card.modality == "CT":
        raise FewLabelError(
            f"{source_path.name} is already a CT model: adapt a model trained on MRI "
            "(`fewlabel finetune` on labelled MRI)."
        )
    source_volumes, notices = _source_volumes(job, card)

    source_net = source_model.network
    n_stages = encoder_stage_count(source_net)
    dam_stages = n_stages if settings.dam_stages is None else settings.dam_stages
    target_net = plug_in_dam(source_net, dam_stages)
    prefixes = dam_prefixes(dam_stages)

    axis, size = card.slice_axis, card.input_size
    in_slices = source_net.config.in_slices
    target_config = settings.normalization()
    source_stacks = _stacks(source_volumes, card.normalization, axis, size, "Source")
    target_stacks = _stacks(job.target, target_config, axis, size, "Target")
    painted = _painted_slices(job, card, target_stacks[0], in_slices)
    yield from notices
    divisor = settings.critic_resolution_divisor

    torch.manual_seed(job.seed)
    rng = np.random.default_rng(job.seed)
    painted_rng = np.random.default_rng([job.seed, 1])
    device = resolve_device(job.device)
    device_text = describe_device(device)
    precision = precision_for(device)
    source_net.to(device).eval()
    target_net.to(device).eval()  # GroupNorm/InstanceNorm: no batch statistics to track
    source_regions, target_regions, region_notices = _critic_regions(
        job,
        source_net,
        (source_stacks, target_stacks),
        source_volumes[0].array.shape,
        axis,
        in_slices,
        device,
        precision,
    )
    yield from region_notices
    cropping = settings.critic_region == "anatomy"

    with torch.no_grad():
        probe = source_stacks[0].windows(torch.tensor([0]), in_slices)
        channels = [m.shape[1] for m in critic_inputs(source_net, probe.to(device), divisor)]
    critic = DomainCritic(channels, width=settings.critic_width).to(device)
    if settings.objective == "clip":
        critic.clip_(settings.clip)
    dam_params = dam_parameters(target_net)
    optimizer = torch.optim.RMSprop(
        [
            {"params": dam_params, "lr": settings.learning_rate},
            {"params": list(critic.parameters()), "lr": settings.learning_rate},
        ]
    )

    checking = settings.check_every > 0
    selecting = checking and settings.check != "last"
    reference: CheckReference | None = None
    if checking:
        num_classes = len(card.classes)
        windows = _evenly_spaced_windows(target_stacks, settings.check_slices, in_slices)
        mr_labels = predicted_labels(
            source_net,
            _evenly_spaced_windows(source_stacks, settings.check_slices, in_slices),
            device,
            precision,
        )
        # The start is the source network itself: the DAM begins as its copy.
        reference = CheckReference(
            target_windows=windows,
            start_labels=predicted_labels(source_net, windows, device, precision),
            source_proportions=class_proportions(mr_labels, num_classes),
            num_classes=num_classes,
        )
    kept_start_text = (
        NO_IMPROVEMENT
        if settings.target_normalization == "ct_window"
        else NO_IMPROVEMENT.replace("the HU window", "the per-volume z-score")
    )

    step0 = 0
    selection: dict[str, Any] = {}
    best_dam = _dam_state(target_net, prefixes)
    if job.resume_from is not None:
        step0, selection, last_dam = _resume(
            job, source_net, target_net, critic, optimizer, dam_stages, device
        )
        best_dam = _dam_state(target_net, prefixes)
        if selecting and not selection:
            # A run without this check's record: the resumed weights are what to beat.
            assert reference is not None
            resumed = label_free_scores(target_net, reference, device, precision)
            selection = {
                "check": settings.check,
                "start_score": float("nan"),
                "best_step": step0,
                "best_score": resumed[settings.check],
                "kept_start": False,
                "checks_done": 1,
            }
        if last_dam:
            target_net.load_state_dict(last_dam, strict=False)
        yield Notice(f"Resuming from {Path(job.resume_from).name} at step {step0}.")

    out = Path(job.out)
    total = job.steps
    start = time.perf_counter()
    last_save = start
    step_times: list[float] = []
    losses: dict[str, float] = {}
    checks: list[dict[str, float]] = []

    def sample(
        stacks: list[SliceStack], regions: list[CriticRegion]
    ) -> tuple[torch.Tensor, list[Box] | None]:
        """A batch of windows from the critic's regions, and their boxes when cropping."""
        picks = rng.integers(0, len(stacks), size=settings.batch_size)
        windows = [
            stacks[s].windows(torch.tensor([regions[s].sample(rng)]), in_slices) for s in picks
        ]
        boxes = [regions[s].box for s in picks] if cropping else None
        return torch.cat(windows).to(device), boxes

    def features(
        network: TwoStreamUNet, batch: tuple[torch.Tensor, list[Box] | None]
    ) -> list[torch.Tensor]:
        with autocast(device, precision):
            return critic_inputs(network, batch[0], divisor, batch[1])

    def verdict() -> str:
        if not selection:
            return "the last checkpoint is kept (no check)"
        if selection["kept_start"]:
            return kept_start_text
        return (
            f"kept the checkpoint of step {selection['best_step']}, the best of "
            f"{selection['checks_done']} checks by {settings.check.replace('_', ' ')}"
        )

    def card_for(steps_done: int) -> ModelCard:
        method = (
            "MRI->CT adaptation (Dou et al. 2018): domain adaptation module "
            "(trainable copy of the first encoder stages) against a Wasserstein domain "
            "critic on multi-level features and logits; higher layers frozen from the "
            "source model"
        )
        if painted is not None:
            method += "; Dice + cross-entropy on the painted CT slices in every DAM update"
        else:
            method = "unsupervised " + method
        training: dict[str, Any] = {
            "method": method,
            "source_model": {
                "path": str(source_path),
                "modality": card.modality,
                "normalization": card.normalization.to_dict(),
                "method": card.training.get("method"),
                "data": card.training.get("data"),
            },
            "dam_stages": dam_stages,
            "dam_layers": list(prefixes),
            "encoder_stages": n_stages,
            "settings": settings.to_dict(),
            "data": {
                "target_scans": [list(v.shape) for v in job.target],
                "target_sources": [str(v.header.get("path", "in memory")) for v in job.target],
                "source_scans": [list(v.shape) for v in source_volumes],
                "slice_axis": axis,
            },
            "ct_labels_used": painted is not None,
            "critic_regions": {
                "mri": [r.to_dict() for r in source_regions],
                "ct": [r.to_dict() for r in target_regions],
            },
            "started_from": str(source_path),
            "steps_done": steps_done,
            "steps_planned": total,
            "seed": job.seed,
            "device": device_text,
            "precision": precision.name,
            "train_seconds": round(time.perf_counter() - start, 1),
        }
        if painted is not None:
            training["ct_labelled_slices"] = [int(i) for i in painted[2]]
        if selection:
            training["selection"] = {**selection, "verdict": verdict()}
        return ModelCard(
            architecture=card.architecture,
            classes=card.classes,
            modality="CT",
            normalization=target_config,
            input_size=card.input_size,
            slice_axis=card.slice_axis,
            training=training,
            # The domain adaptation module learnt CT slices of one plane only: predict
            # along that plane, whatever planes the source model averaged.
            inference={**card.inference, "planes": [card.slice_axis]},
        )

    def save(steps_done: int) -> Path:
        model_card = card_for(steps_done)
        state = nn.ModuleDict({"critic": critic, "last": target_net})
        save_checkpoint(state_path(out), state, model_card, optimizer=optimizer)
        if not selecting:
            return save_checkpoint(out, target_net, model_card)
        last = _dam_state(target_net, prefixes)
        target_net.load_state_dict(best_dam, strict=False)
        try:
            return save_checkpoint(out, target_net, model_card)
        finally:
            target_net.load_state_dict(last, strict=False)

    def check(steps_done: int) -> dict[str, float]:
        """Score the current weights; keep them if they are the best so far."""
        nonlocal best_dam
        assert reference is not None
        scores = label_free_scores(target_net, reference, device, precision)
        checks.append({"step": float(steps_done), **scores})
        if job.checkpoints_dir is not None:
            Path(job.checkpoints_dir).mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                Path(job.checkpoints_dir) / f"step_{steps_done}.safetensors",
                target_net,
                card_for(steps_done),
            )
        if not selecting:
            return scores
        q = quality(scores, settings.check)
        if not selection:
            selection.update(
                check=settings.check,
                start_score=scores[settings.check],
                best_step=steps_done,
                best_score=scores[settings.check],
                kept_start=True,
                checks_done=0,
            )
        elif (
            q
            > quality({settings.check: selection["best_score"]}, settings.check)
            + settings.check_margin
        ):
            best_dam = _dam_state(target_net, prefixes)
            selection.update(best_step=steps_done, best_score=scores[settings.check])
            selection["kept_start"] = False
        selection["checks_done"] += 1
        return scores

    def critic_update() -> float:
        with torch.no_grad():
            real = features(source_net, sample(source_stacks, source_regions))
            fake = features(target_net, sample(target_stacks, target_regions))
        optimizer.zero_grad(set_to_none=True)
        score_real, score_fake = critic(real).mean(), critic(fake).mean()
        loss = score_fake - score_real
        if settings.objective == "gp":
            loss = loss + settings.gp_weight * gradient_penalty(critic, real, fake)
        loss.backward()
        optimizer.step()
        if settings.objective == "clip":
            critic.clip_(settings.clip)
        return float((score_real - score_fake).detach())

    def dam_update() -> dict[str, float]:
        critic.requires_grad_(False)
        optimizer.zero_grad(set_to_none=True)
        adversarial = -critic(features(target_net, sample(target_stacks, target_regions))).mean()
        loss = adversarial
        terms = {"dam": float(adversarial.detach())}
        if painted is not None:
            windows, targets, _ = painted
            # All painted slices when they fit in a batch; else a sample drawn apart from
            # the adversarial batches, so that painting does not change which CT they see.
            pick = (
                torch.arange(len(targets))
                if len(targets) <= settings.batch_size
                else torch.from_numpy(
                    painted_rng.choice(len(targets), settings.batch_size, replace=False)
                )
            )
            x, y = windows[pick].to(device), targets[pick].to(device)
            with autocast(device, precision):
                encoded = target_net.encoder(x)
                logits = (target_net.decoder_a(encoded), target_net.decoder_b(encoded))
            per_stream = [
                dice_ce_loss(z, y, class_balance=SUPERVISED_CLASS_BALANCE)[0] for z in logits
            ]
            supervised = torch.stack(per_stream).mean()
            loss = loss + settings.supervised_weight * supervised
            terms["supervised"] = float(supervised.detach())
        loss.backward()
        optimizer.step()
        critic.requires_grad_(True)
        return terms

    yield Notice(
        f"Adapting {source_path.name} ({card.modality}) to {len(job.target)} CT scan(s) on "
        f"{device_text}: DAM = the first {dam_stages} of {n_stages} encoder stages, "
        f"{settings.critic_updates} critic updates per DAM update, {settings.warmup_steps} "
        f"critic-only warm-up steps, {total} steps, {len(source_stacks)} MRI scan(s)"
        + (
            f", {len(painted[2])} painted CT slice(s) ({', '.join(map(str, painted[2][:8]))})"
            if painted is not None
            else ""
        )
        + (
            f"; every {settings.check_every} steps the {settings.check.replace('_', ' ')} "
            "check decides which checkpoint to keep (the start included)."
            if selecting
            else "."
        )
    )
    if painted is not None:
        yield Notice(
            "With painted CT slices, fine-tuning the MRI model on them (`fewlabel finetune "
            f"--model {source_path.name}`) did better than adaptation with them on both of our "
            "test pairs (docs/adaptation.md): compare the two on your scans."
        )
    if checking and step0 == 0:
        check(0)
    step = step0
    if step0 >= total:
        yield Notice(f"The checkpoint has already done {step0} of {total} steps: nothing to train.")
    while step < total:
        if cancel is not None and cancel.is_set():
            checkpoint = save(step)
            yield Done(
                checkpoint,
                _summary(step, total, losses, start, device_text, dam_stages, selection, checks)
                | ({"verdict": verdict()} if selection else {}),
                cancelled=True,
            )
            return
        t0 = time.perf_counter()
        lr = settings.learning_rate * settings.lr_decay ** (step // settings.lr_decay_every)
        for group in optimizer.param_groups:
            group["lr"] = lr
        warming_up = step < settings.warmup_steps
        estimates = [critic_update() for _ in range(settings.critic_updates)]
        losses = {"wasserstein": estimates[-1]}
        if not warming_up:
            losses.update(dam_update())
        if not all(math.isfinite(v) for v in losses.values()):
            raise FewLabelError(
                "Adaptation diverged (a loss became NaN/Inf): lower the learning rate, or "
                "check the scans for extreme values."
            )
        step += 1
        extra = {
            "warmup": 1.0 if warming_up else 0.0,
            "learning_rate": lr,
            "wasserstein_mean": float(np.mean(estimates)),
        }
        if checking and (step % settings.check_every == 0 or step == total):
            scores = check(step)
            extra.update({f"check_{k}": v for k, v in scores.items()})
        step_times.append(time.perf_counter() - t0)
        yield Progress(
            step=step,
            total=total,
            losses=losses,
            eta_s=(total - step) * float(np.mean(step_times[-20:])),
            device=device_text,
            memory_mb=memory_mb(device),
            phase="adapt",
            extra=extra,
        )
        if time.perf_counter() - last_save >= job.checkpoint_every_s:
            save(step)
            last_save = time.perf_counter()
    checkpoint = save(step)
    if selection:
        yield Notice(
            verdict()
            + f" ({settings.check.replace('_', ' ')}: {selection['start_score']:.3f} at the "
            f"start, {selection['best_score']:.3f} kept).",
            level="warning" if selection["kept_start"] else "info",
        )
    summary = _summary(step, total, losses, start, device_text, dam_stages, selection, checks)
    if selection:
        summary["verdict"] = verdict()
    yield Done(checkpoint, summary)


def _resume(
    job: AdaptJob,
    source_net: TwoStreamUNet,
    target_net: TwoStreamUNet,
    critic: DomainCritic,
    optimizer: torch.optim.Optimizer,
    dam_stages: int,
    device: torch.device,
) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """Load an earlier run's kept DAM, critic and optimizer into the networks.

    Returns its steps done, its checkpoint selection so far (empty without
    one) and the DAM weights of its last step (empty when the state file
    predates them: then the kept ones go on).
    """
    assert job.resume_from is not None
    path = resolve_model(job.resume_from)
    state = state_path(path)
    if not state.is_file():
        raise FewLabelError(
            f"No training state {state.name} next to {path.name}: resume from the files an "
            "earlier `fewlabel adapt` wrote (both must be there)."
        )
    card = read_card(path)
    if int(card.training.get("dam_stages", -1)) != dam_stages:
        raise FewLabelError(
            f"{path.name} was adapted with a DAM of {card.training.get('dam_stages')} stages, this "
            f"run asks for {dam_stages}: resume with the same settings."
        )
    tensors = read_model_tensors(path)
    prefixes = dam_prefixes(dam_stages)
    reference = source_net.state_dict()
    for key, value in tensors.items():
        if not key.startswith(prefixes) and (
            key not in reference or not torch.equal(value, reference[key].cpu())
        ):
            raise FewLabelError(
                f"{path.name} was adapted from another source model: resume with the same "
                "source model, or start a new run."
            )
    dam_state = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    missing = [k for k in target_net.state_dict() if k.startswith(prefixes) and k not in dam_state]
    if missing:
        raise FewLabelError(
            f"{path.name} lacks DAM weights ({missing[0]}): it is damaged; start anew."
        )
    target_net.load_state_dict({**target_net.state_dict(), **dam_state})
    state_tensors = read_model_tensors(state)
    critic_state = {
        k.removeprefix("critic."): v for k, v in state_tensors.items() if k.startswith("critic.")
    }
    last_dam = {
        k.removeprefix("last."): v
        for k, v in state_tensors.items()
        if k.startswith("last.") and k.removeprefix("last.").startswith(prefixes)
    }
    try:
        critic.load_state_dict(critic_state)
    except RuntimeError as e:
        raise FewLabelError(
            f"{state.name} does not match these settings ({str(e).splitlines()[0]}): resume "
            "with the same settings, or start a new run."
        ) from e
    critic.to(device)
    optimizer_state = load_optimizer_state(state)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    selection = dict(card.training.get("selection") or {})
    selection.pop("verdict", None)
    if selection and selection.get("check") != job.settings.check:
        selection = {}  # another check: the kept weights compete anew from the next check
    return int(card.training.get("steps_done", 0)), selection, last_dam


def _summary(
    step: int,
    total: int,
    losses: Mapping[str, float],
    start: float,
    device: str,
    dam_stages: int,
    selection: Mapping[str, Any],
    checks: list[dict[str, float]],
) -> dict[str, Any]:
    return {
        "selection": dict(selection),
        "checks": checks,
        "steps_done": step,
        "steps_planned": total,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_losses": dict(losses),
        "device": device,
        "dam_stages": dam_stages,
        "package_version": __version__,
    }
