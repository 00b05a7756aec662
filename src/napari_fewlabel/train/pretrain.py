"""Self-supervised pretraining of the fine-tuning encoder: IDEAL dense contrast or med-moco.

``run(job)`` is a generator of events (:mod:`napari_fewlabel.train.events`),
like fine-tuning: :class:`Notice`, :class:`Progress` after every step (its
``extra`` carries the effective rank of the embeddings and the throughput),
and one final :class:`Done`. The network is the fine-tuning network's
:class:`~napari_fewlabel.models.unet2d.Encoder` with the same ``in_slices``
and widths, so the weights load into fine-tuning as they are.

One step
--------
A batch of slice windows is drawn from the archive
(:mod:`napari_fewlabel.data.archive`); two views of each are made with a
known correspondence (:mod:`napari_fewlabel.data.views`). Both views go
through the query network (encoder + heads); a key network -- a momentum
copy (MoCo's :math:`\\theta_k \\leftarrow m \\theta_k + (1 - m) \\theta_q`),
or the query network itself with ``key_encoder="shared"`` -- gives the keys.
The loss is a weighted sum of

* ``dense`` (IDEAL): pixel-level InfoNCE at sampled corresponding locations
  of a dense 1x1-convolution projection (:mod:`napari_fewlabel.losses.dense_contrastive`);
* ``global`` (MoCo v2): InfoNCE of pooled embeddings through an MLP head
  against a queue of keys (:mod:`napari_fewlabel.losses.moco`);
* ``local`` (med-moco's local feature learning): the same contrast between
  corresponding *regions* of the dense map (mean of a small grid of
  locations), through their own MLP head;
* ``decorrelation`` (med-moco): the off-diagonal correlation penalty on the
  pooled encoder embeddings, before any projector
  (:mod:`napari_fewlabel.losses.decorrelation`).

:meth:`PretrainSettings.for_method` gives each method's defaults; every
paper setting (momentum 0.999, a 65 536-key queue, the deepest level only for
the dense head, ...) is reachable through the fields, and the model card
lists where a run departs from the paper.

Distributed
-----------
Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the job
initialises ``torch.distributed`` (NCCL on CUDA, gloo on CPU), wraps the
query network in :class:`~torch.nn.parallel.DistributedDataParallel`, shards
the archive with :class:`~torch.utils.data.DistributedSampler`, and gathers
every rank's keys into the queue. The momentum network needs no
synchronisation: it follows the query weights, which DDP keeps equal. The
encoder uses GroupNorm, so MoCo's shuffled BatchNorm is not needed. Only
rank 0 yields events and writes checkpoints; all ranks meet at a barrier at
the end. ``batch_size`` is per process.

Checkpoints
-----------
``out`` gets the encoder alone (what fine-tuning and the registry use; a few
MB) and ``<out stem>.state.safetensors`` the training state (query and key
networks with heads, queue, optimizer, step count), both rewritten
atomically every ``checkpoint_every`` steps and at the end; ``resume_from``
(either file) continues from the state. ``init_from`` starts a new run from
another encoder's weights (a shipped one, say) with fresh heads: continued
pretraining on one's own scans, which the card records with the earlier
encoder's data.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from napari_fewlabel.data.archive import EpochIndices, SliceArchive, SliceBlocks, collate_blocks
from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.views import ViewConfig, ViewPair, make_view_pair
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.losses.decorrelation import off_diagonal_correlation_penalty
from napari_fewlabel.losses.dense_contrastive import (
    dense_infonce,
    sample_dense,
    symmetric_dense_infonce,
)
from napari_fewlabel.losses.moco import KeyQueue, moco_infonce
from napari_fewlabel.models.checkpoint import (
    ENCODER_ONLY_KEY,
    ModelCard,
    check_output_path,
    load_encoder_weights,
    load_optimizer_state,
    read_card,
    read_model_tensors,
    save_checkpoint,
    save_encoder_checkpoint,
    state_path,
)
from napari_fewlabel.models.heads import MLPHead, hypercolumn, level_channels
from napari_fewlabel.models.registry import resolve_model
from napari_fewlabel.models.unet2d import DenseProjectionHead, Encoder, UNetConfig
from napari_fewlabel.train.collapse import effective_rank
from napari_fewlabel.train.device import (
    autocast,
    describe_device,
    precision_for,
)
from napari_fewlabel.train.events import CancelFlag, Event, Notice
from napari_fewlabel.train.pretrain_base import (
    Ranks,
    TrainingLoop,
    backward_and_step,
    card_modality,
    device_for,
    finish_distributed,
    init_distributed,
    lr_factor,
    momentum_update,
    move_optimizer_state,
    run_record,
)

Method = Literal["ideal", "medmoco"]
METHODS: tuple[Method, ...] = ("ideal", "medmoco")

#: Default number of steps: about 30 minutes on 2 CPU cores at the default sizes.
DEFAULT_STEPS = 1500


@dataclass(frozen=True)
class PretrainSettings:
    """What is learned and how; :meth:`for_method` gives each method's defaults.

    Attributes
    ----------
    method : {"ideal", "medmoco"}
        Name of the method (recorded in the card; the weights below decide the loss).
    dense_weight, global_weight, local_weight, decorrelation_weight : float
        Weights of the loss terms (see the module docstring); 0 turns a term
        and its head off.
    temperature : float
        InfoNCE temperature of every contrastive term (IDEAL 0.1-0.2, MoCo v2 0.2).
    key_encoder : {"momentum", "shared"}
        Keys from a momentum copy of the query network, or from the query
        network itself (gradients through both views).
    momentum : float
        :math:`m` of the momentum update. MoCo uses 0.999 over hundreds of
        thousands of steps; over a few thousand, 0.99 lets the keys follow
        the query network within ~100 steps instead of ~1000.
    queue_size : int or None
        Keys kept as negatives for the global term. None: a quarter of the
        archive's usable slices, rounded down to a multiple of the global
        batch, between one global batch and 65 536 (MoCo's). A queue much
        longer than the number of distinct slices fills with other views of
        the very slices in the batch (false negatives) encoded by a stale
        key network.
    points_per_image : int
        Locations sampled per view for the dense term (bounds its memory).
    neighbourhood : float
        Radius (source-slice normalised units) of extra dense positives; 0 = none.
    dense_levels : tuple of int
        Encoder levels the dense and local heads see (see
        :func:`~napari_fewlabel.models.heads.hypercolumn`; IDEAL: ``(-1,)``).
    projection_dim, hidden_dim : int
        Output length of every head; hidden width of the MLP heads.
    regions_per_image : int
        Regions per view for the local term.
    region_size : float
        Side of a region as a fraction of the view.
    batch_size : int
        Slices per step and process (a multiple of ``block_size``).
    block_size : int
        Consecutive slices drawn from one scan (see :class:`~napari_fewlabel.data.archive.SliceBlocks`).
    learning_rate, weight_decay : float
        AdamW; linear warm-up over the first 10 steps, then cosine decay to 0
        over the steps (or over the time budget, when that ends first).
    views : ViewConfig
    rank_every : int
        Steps between effective-rank evaluations (on the last ``rank_window`` embeddings).
    rank_window : int
        Pooled embeddings kept for the effective rank.
    """

    method: Method = "ideal"
    dense_weight: float = 1.0
    global_weight: float = 0.0
    local_weight: float = 0.0
    decorrelation_weight: float = 0.0
    temperature: float = 0.2
    key_encoder: Literal["momentum", "shared"] = "momentum"
    momentum: float = 0.99
    queue_size: int | None = None
    points_per_image: int = 64
    neighbourhood: float = 0.0
    dense_levels: tuple[int, ...] = (-3, -2, -1)
    projection_dim: int = 128
    hidden_dim: int = 512
    regions_per_image: int = 4
    region_size: float = 0.25
    batch_size: int = 32
    block_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    views: ViewConfig = field(default_factory=ViewConfig)
    rank_every: int = 25
    rank_window: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FewLabelError(f"Unknown method {self.method!r}: use one of {', '.join(METHODS)}.")
        if self.key_encoder not in ("momentum", "shared"):
            raise FewLabelError("key_encoder must be 'momentum' or 'shared'.")
        if self.batch_size < 2 or self.batch_size % self.block_size:
            raise FewLabelError(
                f"batch_size ({self.batch_size}) must be at least 2 and a multiple of "
                f"block_size ({self.block_size})."
            )
        if not 0 <= self.momentum < 1:
            raise FewLabelError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.temperature <= 0:
            raise FewLabelError(f"temperature must be positive, got {self.temperature}.")
        if self.queue_size is not None and self.queue_size < 1:
            raise FewLabelError(f"queue_size must be at least 1, got {self.queue_size}.")
        weights = (
            self.dense_weight,
            self.global_weight,
            self.local_weight,
            self.decorrelation_weight,
        )
        if min(weights) < 0 or max(weights[:3]) == 0:
            raise FewLabelError(
                "Loss weights must be >= 0 and at least one contrastive term (dense, global, "
                "local) must be on."
            )

    @classmethod
    def for_method(cls, method: str) -> PretrainSettings:
        """The defaults of ``"ideal"`` (dense term) or ``"medmoco"`` (global + local + decorrelation)."""
        if method == "ideal":
            return cls(method="ideal")
        if method == "medmoco":
            return cls(
                method="medmoco",
                dense_weight=0.0,
                global_weight=1.0,
                local_weight=1.0,
                decorrelation_weight=1.0,
            )
        raise FewLabelError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["views"] = self.views.to_dict()
        d["dense_levels"] = list(self.dense_levels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainSettings:
        kwargs = dict(d)
        kwargs["views"] = ViewConfig.from_dict(kwargs.get("views", {}))
        if "dense_levels" in kwargs:
            kwargs["dense_levels"] = tuple(kwargs["dense_levels"])
        return cls(**kwargs)

    def differences_from_paper(self) -> list[str]:
        """Where these settings depart from the published method."""
        out = []
        if self.method == "ideal":
            if self.dense_levels != (-1,):
                out.append(
                    f"dense head on encoder levels {list(self.dense_levels)} upsampled and "
                    "concatenated (paper: the deepest map)"
                )
            if self.global_weight or self.local_weight or self.decorrelation_weight:
                out.append("extra global/local/decorrelation terms")
        else:
            if self.momentum != 0.999:
                out.append(f"momentum {self.momentum} (MoCo v2: 0.999)")
            if self.queue_size != 65536:
                out.append(
                    f"queue of {self.queue_size or 'auto'} keys (MoCo v2: 65536), sized to the data"
                )
            if self.dense_weight:
                out.append("extra IDEAL dense term")
        if self.key_encoder == "momentum" and self.method == "ideal":
            out.append(f"key encoder E_K a momentum copy (m = {self.momentum})")
        out.append(
            f"AdamW lr {self.learning_rate} with warm-up and cosine decay (MoCo v2: SGD lr 0.03)"
        )
        return out


@dataclass(frozen=True)
class PretrainJob:
    """Everything a pretraining run needs; the defaults give a useful encoder.

    Attributes
    ----------
    data : tuple of path
        Scan files and folders (NIfTI, NRRD, MetaImage, InVesalius, DICOM series).
    out : Path
        Encoder checkpoint to write (``.safetensors``); the training state
        goes next to it as ``<stem>.state.safetensors``.
    settings : PretrainSettings
    architecture : UNetConfig
        The fine-tuning network's architecture (only the encoder is trained;
        ``in_slices`` and widths must match the network it will be loaded into).
    steps : int
        Training steps (each of ``settings.batch_size`` slices per process).
    time_budget_s : float, optional
        Stop after this many seconds even if ``steps`` are not done; the
        learning-rate schedule then follows the clock, so it still ends decayed.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (under
        torchrun, CUDA ranks use ``cuda:LOCAL_RANK``).
    seed : int
    checkpoint_every : int
        Steps between checkpoints.
    resume_from : Path, optional
        An earlier run's encoder or state file to continue from.
    init_from : Path or str, optional
        An encoder (file or registry name) whose weights start this run, with
        fresh heads, optimizer and step count: continued (domain-adaptive)
        pretraining. Not together with ``resume_from``.
    slice_size : int
        Side slices are fitted to before the views are cut from them.
    ct_window_hu : tuple of float
        HU window of the CT normalisation (fine-tuning's default).
    cache_scans : int
        Scans kept in memory at most (see :class:`~napari_fewlabel.data.archive.SliceArchive`).
    cache_mb : float
        Megabytes of voxels kept in memory at most.
    half : bool
        Store the encoder checkpoint in float16 (half the size).
    num_workers : int
        Data-loading processes. One (the default) prepares the next batch
        while the network trains, with one thread: small tensor operations
        on two busy cores ran ten times slower with two threads than with one.
    """

    data: tuple[str | Path, ...]
    out: Path
    settings: PretrainSettings = field(default_factory=PretrainSettings)
    architecture: UNetConfig = field(default_factory=UNetConfig)
    steps: int = DEFAULT_STEPS
    time_budget_s: float | None = None
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    resume_from: Path | None = None
    init_from: Path | str | None = None
    slice_size: int = 256
    ct_window_hu: tuple[float, float] = (-300.0, 400.0)
    cache_scans: int = 8
    cache_mb: float = 1024.0
    half: bool = False
    num_workers: int = 1


# ------------------------------------------------------------------ networks
@dataclass
class _Outputs:
    features: list[torch.Tensor]  # the encoder's maps, full resolution first
    pooled: torch.Tensor  # (N, C) mean of the deepest map: the encoder's embedding
    dense: torch.Tensor | None  # (N, D, h, w) unit vectors per pixel
    hyper: torch.Tensor | None  # (N, C', h, w) hypercolumn for the local term
    global_: torch.Tensor | None  # (N, D) unit vectors


class PretrainNetwork(nn.Module):
    """The fine-tuning :class:`Encoder` plus the heads the settings switch on.

    ``forward(x)`` with ``x`` of shape ``(N, in_slices, h, w)`` returns the
    encoder's maps, its pooled embedding ``(N, widths[-1])`` and the heads'
    outputs (dense ``(N, D, h', w')``, global ``(N, D)``).
    """

    def __init__(self, config: UNetConfig, settings: PretrainSettings) -> None:
        super().__init__()
        self.encoder = Encoder(config)
        self.levels = settings.dense_levels
        hyper = level_channels(config.widths, config.full_res_width, settings.dense_levels)
        d, hidden = settings.projection_dim, settings.hidden_dim
        self.dense_head = DenseProjectionHead(hyper, d) if settings.dense_weight else None
        self.global_head = MLPHead(config.widths[-1], hidden, d) if settings.global_weight else None
        self.local_head = MLPHead(hyper, hidden, d) if settings.local_weight else None

    def forward(self, x: torch.Tensor) -> _Outputs:
        features = self.encoder(x)
        pooled = features[-1].mean(dim=(2, 3))
        hyper = None
        if self.dense_head is not None or self.local_head is not None:
            hyper = hypercolumn(features, self.levels)
        return _Outputs(
            features=features,
            pooled=pooled,
            dense=None if self.dense_head is None or hyper is None else self.dense_head(hyper),
            hyper=hyper,
            global_=None if self.global_head is None else self.global_head(pooled),
        )


def _region_embeddings(
    hyper: torch.Tensor, centres: torch.Tensor, half_side: float, head: MLPHead, pair: ViewPair
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hypercolumn over a 3x3 grid of locations around each centre, projected.

    ``hyper`` holds both views (first half view 1); ``centres`` are view-1
    locations ``(B, R, 2)``. Returns unit embeddings ``(2, B, R, D)`` (view 1,
    then the corresponding regions of view 2) and a ``(B, R)`` mask of regions
    whose whole grid lies inside view 2.
    """
    b, r = centres.shape[:2]
    steps = torch.linspace(-half_side, half_side, 3, device=centres.device, dtype=centres.dtype)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1).reshape(9, 2)
    grid1 = (centres[:, :, None, :] + offsets).reshape(b, r * 9, 2)
    grid2 = pair.first_to_second(grid1)
    inside = (grid2.abs() <= 1).all(dim=-1).reshape(b, r, 9).all(dim=-1)
    out = []
    for maps, grid in ((hyper[:b], grid1), (hyper[b:], grid2)):
        sampled = sample_dense(maps, grid).reshape(b, r, 9, -1).mean(dim=2)
        out.append(head(sampled))
    return torch.stack(out), inside


# ------------------------------------------------------------------- helpers
def _auto_queue_size(slices: int, global_batch: int) -> int:
    quarter = (slices // 4) // global_batch * global_batch
    return int(min(65536, max(global_batch, quarter)))


# ------------------------------------------------------------------------ run
def run(job: PretrainJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Pretrain the encoder on ``job.data``; yields Notice/Progress events and one final Done.

    Under torchrun only rank 0 yields events; the other ranks train silently.

    Parameters
    ----------
    job : PretrainJob
    cancel : CancelFlag, optional
        Checked between steps (on rank 0; all ranks stop together); when set,
        the current weights are saved and ``Done(cancelled=True)`` is yielded.

    Raises
    ------
    FewLabelError
        For problems with the inputs (raised before training starts).
    """
    out = check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    if job.slice_size % job.architecture.size_divisor:
        raise FewLabelError(
            f"slice_size must be a multiple of {job.architecture.size_divisor}, got {job.slice_size}."
        )
    if any(s % job.architecture.size_divisor for s in job.settings.views.size):
        raise FewLabelError(
            f"The view size {job.settings.views.size} must be a multiple of "
            f"{job.architecture.size_divisor} on each side."
        )
    if job.init_from is not None and job.resume_from is not None:
        raise FewLabelError(
            "Give either an encoder to start from (--init) or a run to resume (--resume), not both."
        )
    ranks = init_distributed(job.device)
    try:
        yield from _train(job, out, ranks, cancel)
    finally:
        finish_distributed(ranks)


def _train(job: PretrainJob, out: Path, ranks: Ranks, cancel: CancelFlag | None) -> Iterator[Event]:
    settings = job.settings
    device = device_for(job.device, ranks)
    device_text = describe_device(device)
    precision = precision_for(device)
    archive = SliceArchive(
        job.data,
        in_slices=job.architecture.in_slices,
        slice_size=job.slice_size,
        ct_window_hu=job.ct_window_hu,
        cache_scans=job.cache_scans,
        cache_mb=job.cache_mb,
    )
    blocks = SliceBlocks(archive, block_size=settings.block_size, seed=job.seed)
    sampler: DistributedSampler[torch.Tensor] = DistributedSampler(
        blocks,
        num_replicas=ranks.world_size,
        rank=ranks.rank,
        shuffle=True,
        seed=job.seed,
        drop_last=True,
    )
    indices = EpochIndices(sampler)
    loader = DataLoader(
        blocks,
        batch_size=settings.batch_size // settings.block_size,
        sampler=indices,
        collate_fn=collate_blocks,
        num_workers=job.num_workers,
        persistent_workers=job.num_workers > 0,
        drop_last=True,
    )
    if len(loader) == 0:
        raise FewLabelError(
            f"The data hold {len(archive)} usable slices, too few for batches of "
            f"{settings.batch_size} slices on {ranks.world_size} process(es): add scans or "
            "lower the batch size."
        )
    global_batch = settings.batch_size * ranks.world_size
    queue_size = settings.queue_size or _auto_queue_size(len(archive), global_batch)

    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed + 1000 * ranks.rank)
    query = PretrainNetwork(job.architecture, settings)
    continued_from = None if job.init_from is None else _init_encoder(job, query)
    key = copy.deepcopy(query).requires_grad_(False) if settings.key_encoder == "momentum" else None
    queue = KeyQueue(queue_size, settings.projection_dim)
    optimizer = torch.optim.AdamW(
        query.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    step0 = 0
    train_seconds0 = 0.0
    if job.resume_from is not None:
        step0, train_seconds0, continued_from = _resume(job, query, key, queue, optimizer)
    query.to(device).train()
    if key is not None:
        key.to(device).train()
    queue.to(device)
    move_optimizer_state(optimizer, device)
    model: nn.Module = query
    if ranks.world_size > 1:
        model = DistributedDataParallel(
            query, device_ids=[device.index] if device.type == "cuda" else None
        )
    scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None

    if ranks.is_main:
        if step0:
            yield Notice(f"Resuming from {Path(job.resume_from or '').name} at step {step0}.")
        if job.init_from is not None and continued_from is not None:
            yield Notice(f"Starting from the encoder {continued_from['encoder']}.")
        queue_text = f", a queue of {queue_size} keys" if settings.global_weight else ""
        yield Notice(
            f"Pretraining ({settings.method}) on {device_text} ({precision.name}) x "
            f"{ranks.world_size} process(es): {len(archive.scans)} scans, {len(archive)} usable "
            f"slices, batches of {settings.batch_size} per process{queue_text}, {job.steps} steps."
        )

    batches_per_epoch = len(loader)

    def batches(start_step: int) -> Iterator[torch.Tensor]:
        epoch = start_step // batches_per_epoch
        while True:
            indices.set_epoch(epoch)
            yield from loader
            epoch += 1

    recent: list[torch.Tensor] = []
    recent_projected: list[torch.Tensor] = []
    ranks_figures: dict[str, float] = {}
    start = time.perf_counter()

    def progress_at(step: int) -> float:
        """Fraction of the run done: by steps, or by time when a time budget is set."""
        p = step / job.steps
        if job.time_budget_s is not None:
            p = max(p, (time.perf_counter() - start) / job.time_budget_s)
        return min(1.0, p)

    def card_for(steps_done: int) -> ModelCard:
        modalities = archive.survey()
        modality = card_modality(modalities)
        normalization = NormalizationConfig.for_modality(modality, window_hu=job.ct_window_hu)
        return ModelCard(
            architecture={**job.architecture.to_dict(), ENCODER_ONLY_KEY: True},
            # An encoder has no classes; the card format asks for two.
            classes=default_classes(2),
            modality=modality,
            normalization=normalization,
            input_size=(job.slice_size, job.slice_size),
            slice_axis=0,
            training={
                "kind": "pretrained encoder",
                "method": _method_text(settings),
                "differences_from_paper": settings.differences_from_paper(),
                "settings": {**settings.to_dict(), "queue_size": queue_size},
                "data": {
                    "scans": archive.describe(),
                    "usable_slices": len(archive),
                    "slice_size": job.slice_size,
                    "in_slices": job.architecture.in_slices,
                    "normalization": (
                        "per scan by modality, as fine-tuning normalises it: CT clipped to "
                        f"{list(job.ct_window_hu)} HU -> [-1, 1]; MR clipped to its 0.5-99.5th "
                        "percentiles, then z-scored"
                    ),
                },
                **run_record(
                    steps_done=steps_done,
                    steps_planned=job.steps,
                    global_batch=global_batch,
                    ranks=ranks,
                    seed=job.seed,
                    device_text=device_text,
                    precision_name=precision.name,
                    train_seconds=train_seconds0 + time.perf_counter() - start,
                    half=job.half,
                ),
                **({"continued_from": continued_from} if continued_from else {}),
                **ranks_figures,
            },
        )

    def save(steps_done: int) -> Path:
        card = card_for(steps_done)
        state = nn.ModuleDict({"query": query, "queue": queue})
        if key is not None:
            state["key"] = key
        save_checkpoint(state_path(out), state, card, optimizer=optimizer)
        return save_encoder_checkpoint(out, query.encoder, card, half=job.half)

    def train_step(batch: torch.Tensor, step: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * lr_factor(step, progress_at(step))
        batch = batch.to(device, non_blocking=True)
        pair = make_view_pair(batch, settings.views, generator)
        b = batch.shape[0]
        both = torch.cat([pair.first, pair.second])
        parts: dict[str, torch.Tensor] = {}
        new_keys: torch.Tensor | None = None
        with autocast(device, precision):
            q = model(both)
            if key is not None:
                with torch.no_grad():
                    k = key(both)
            if settings.dense_weight and q.dense is not None:
                p1, p2, valid = pair.corresponding_points(settings.points_per_image, generator)
                p1, p2, valid = p1.to(device), p2.to(device), valid.to(device)
                k_dense = k.dense if key is not None else q.dense
                assert k_dense is not None
                q1 = F.normalize(sample_dense(q.dense[:b], p1), dim=-1)
                q2 = F.normalize(sample_dense(q.dense[b:], p2), dim=-1)
                k1 = F.normalize(sample_dense(k_dense[:b], p1), dim=-1)
                k2 = F.normalize(sample_dense(k_dense[b:], p2), dim=-1)
                parts["dense"] = symmetric_dense_infonce(
                    q1, q2, k1, k2,
                    temperature=settings.temperature,
                    source_points=pair.source_points(p1),
                    neighbourhood=settings.neighbourhood,
                    valid=valid,
                )  # fmt: skip
            if settings.global_weight and q.global_ is not None:
                k_global = k.global_ if key is not None else q.global_
                assert k_global is not None
                k_global = k_global.detach()
                parts["global"] = 0.5 * (
                    moco_infonce(q.global_[:b], k_global[b:], queue.keys, temperature=settings.temperature)
                    + moco_infonce(q.global_[b:], k_global[:b], queue.keys, temperature=settings.temperature)
                )  # fmt: skip
                new_keys = k_global[b:]
            if settings.local_weight and q.hyper is not None:
                head = query.local_head
                assert head is not None
                centres, _, valid_c = pair.corresponding_points(
                    settings.regions_per_image, generator
                )
                centres = centres.to(device)
                # A view spans 2 normalised units, so half a side of region_size views is region_size.
                half_side = settings.region_size
                (r1, r2), inside = _region_embeddings(q.hyper, centres, half_side, head, pair)
                if key is not None:
                    key_head = key.local_head
                    assert key_head is not None and k.hyper is not None
                    with torch.no_grad():
                        (s1, s2), _ = _region_embeddings(
                            k.hyper, centres, half_side, key_head, pair
                        )
                else:
                    s1, s2 = r1, r2
                ok = inside & valid_c.to(device)
                parts["local"] = 0.5 * (
                    dense_infonce(r1, s2, temperature=settings.temperature, valid=ok)
                    + dense_infonce(r2, s1, temperature=settings.temperature, valid=ok)
                )  # fmt: skip
            if settings.decorrelation_weight:
                parts["decorrelation"] = off_diagonal_correlation_penalty(q.pooled)
        weights = {
            "dense": settings.dense_weight,
            "global": settings.global_weight,
            "local": settings.local_weight,
            "decorrelation": settings.decorrelation_weight,
        }
        loss = sum(weights[name] * value for name, value in parts.items())
        assert isinstance(loss, torch.Tensor)
        backward_and_step(loss, optimizer, scaler)
        if new_keys is not None:
            # After the backward pass: the loss's graph holds the queue as it was.
            queue.enqueue(new_keys)
        if key is not None:
            momentum_update(query, key, settings.momentum)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FewLabelError(
                "Pretraining diverged (the loss became NaN/Inf): lower the learning rate."
            )
        recent.append(q.pooled.detach().float().cpu())
        if q.global_ is not None:
            recent_projected.append(q.global_.detach().float().cpu())
        return {"total": value, **{name: float(v.detach()) for name, v in parts.items()}}

    data = batches(step0)

    def one_step(step: int) -> dict[str, float]:
        losses = train_step(next(data), step)
        _keep_last_rows(recent, settings.rank_window)
        _keep_last_rows(recent_projected, settings.rank_window)
        return losses

    def after_step(step: int, per_step: float) -> None:
        if step % settings.rank_every == 0 or step == job.steps:
            ranks_figures["effective_rank"] = round(effective_rank(torch.cat(recent)), 2)
            if recent_projected:
                ranks_figures["effective_rank_projection"] = round(
                    effective_rank(torch.cat(recent_projected)), 2
                )
        ranks_figures["slices_per_s"] = round(global_batch / per_step, 2)

    yield from TrainingLoop(
        steps=job.steps,
        step0=step0,
        one_step=one_step,
        after_step=after_step,
        figures=ranks_figures,
        save=save,
        checkpoint_every=job.checkpoint_every,
        ranks=ranks,
        device=device,
        device_text=device_text,
        state_file=state_path(out),
        queue_keys_seen=lambda: int(queue.keys_seen),
        start=start,
        train_seconds0=train_seconds0,
        time_budget_s=job.time_budget_s,
    ).run(cancel)


def _keep_last_rows(chunks: list[torch.Tensor], rows: int) -> None:
    """Drop the oldest chunks while the rest still hold at least ``rows`` rows."""
    while len(chunks) > 1 and sum(c.shape[0] for c in chunks[1:]) >= rows:
        chunks.pop(0)


def _method_text(settings: PretrainSettings) -> str:
    if settings.method == "ideal":
        return (
            "IDEAL dense contrastive pretraining: pixel-level InfoNCE between corresponding "
            "locations of two augmented views (dense 1x1-conv projection, per-pixel L2 norm)"
        )
    return (
        "med-moco: MoCo v2 (momentum encoder, key queue, MLP head) + local region contrast "
        "on the dense map + off-diagonal correlation penalty on the encoder embedding"
    )


def _init_encoder(job: PretrainJob, query: PretrainNetwork) -> dict[str, Any]:
    """Load ``job.init_from``'s encoder into ``query``; return what the card records of it."""
    assert job.init_from is not None
    path = resolve_model(job.init_from)
    card = read_card(path)
    fields = ("in_slices", "widths", "full_res_width", "norm")
    theirs = UNetConfig.from_dict(card.architecture).to_dict()
    ours = job.architecture.to_dict()
    if any(theirs[f] != ours[f] for f in fields):
        raise FewLabelError(
            f"The encoder in {path.name} has another architecture than this run "
            f"({', '.join(f'{f} {theirs[f]}' for f in fields if theirs[f] != ours[f])}): start "
            "from an encoder of the fine-tuning network, or leave out --init."
        )
    load_encoder_weights(query, path)
    earlier = card.training
    return {
        "encoder": path.name,
        "method": earlier.get("method"),
        "steps_done": earlier.get("steps_done"),
        # Its data and any it continued from: what a benchmark must know the weights saw.
        "scans": earlier.get("data", {}).get("scans", []),
        **({"continued_from": earlier["continued_from"]} if "continued_from" in earlier else {}),
    }


def _resume(
    job: PretrainJob,
    query: PretrainNetwork,
    key: PretrainNetwork | None,
    queue: KeyQueue,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, float, dict[str, Any] | None]:
    """Load the training state into the fresh objects.

    Returns the steps done, the seconds trained and, for a continued run, the
    card's record of the encoder it started from (kept on every later card).
    """
    assert job.resume_from is not None
    path = state_path(job.resume_from)
    if not path.is_file():
        raise FewLabelError(
            f"No training state {path.name} next to {Path(job.resume_from).name}: resume from "
            "the files an earlier `fewlabel pretrain` wrote (both must be there)."
        )
    card = read_card(path)
    saved = card.training.get("settings", {})
    if (
        UNetConfig.from_dict(card.architecture) != job.architecture
        or saved.get("method") != job.settings.method
    ):
        raise FewLabelError(
            f"{path.name} was pretrained with another method or architecture: resume with the "
            "same --method and network, or start a new run."
        )
    tensors = read_model_tensors(path)
    state = nn.ModuleDict({"query": query, "queue": queue})
    if key is not None:
        state["key"] = key
    if int(tensors["queue.keys"].shape[0]) != queue.size:
        raise FewLabelError(
            f"{path.name} has a queue of {tensors['queue.keys'].shape[0]} keys, this run asks "
            f"for {queue.size}: resume with the same --queue-size and batch size."
        )
    try:
        state.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise FewLabelError(
            f"{path.name} does not match these settings ({str(e).splitlines()[0]}): resume "
            "with the same settings, or start a new run."
        ) from e
    optimizer_state = load_optimizer_state(path)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return (
        int(card.training.get("steps_done", 0)),
        float(card.training.get("train_seconds", 0.0)),
        card.training.get("continued_from"),
    )


def with_overrides(settings: PretrainSettings, **changes: Any) -> PretrainSettings:
    """``settings`` with the given fields changed, ignoring the ones given as None."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
