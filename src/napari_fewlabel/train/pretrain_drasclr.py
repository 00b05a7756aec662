"""DrasCLR pretraining of the 3D location-conditioned encoder on unlabelled chest CT.

``run(job)`` is a generator of events like the other pretraining methods
(:mod:`napari_fewlabel.train.pretrain`): a :class:`Notice`, a
:class:`Progress` after every step and one final :class:`Done`.

Data
----
Scans (files and DICOM folders, found as :func:`~napari_fewlabel.data.archive.find_scans`
finds them) are read lazily: only headers at the start; a scan's voxels when
a batch first needs it. Its lungs are segmented once
(:func:`~napari_fewlabel.infer.lungs.segment_lungs`) and the lung mask is
kept (bit-packed, a few MB per scan) for the rest of the run; the lung box
resampled to the patch spacing (:func:`~napari_fewlabel.data.patches3d.prepare_scan`)
is kept for at most ``cache_scans`` scans at a time. Under torchrun each
rank reads its own share of the scans (every ``world_size``-th, when there
are at least as many scans as ranks).

One step
--------
Each rank draws ``batch_size`` anchor patches (centres at random lung
voxels of two scans of its share) and, for each, the patches at its two
nearest locations: one patch side away in random directions (DrasCLR takes
its atlas' two nearest anatomical locations). Every patch is augmented
independently (:class:`~napari_fewlabel.data.patches3d.PatchAugment`: affine
+-12 of 32 voxels, +-10 degrees, +-10 %; noise; contrast). The query
network (encoder + MLP head 128-128-128) embeds one view of each anchor and
both neighbours in one forward pass; a momentum copy (m = 0.999) embeds the
second view of the anchor: the key. The loss is
:math:`L_{local} + L_{neighbour}` with negatives from the queue of the
anchor's location bin (:mod:`napari_fewlabel.losses.drasclr`). Keys then go
into their bins' queues, gathered from all ranks first.

Distributed, checkpoints, resume: as :mod:`napari_fewlabel.train.pretrain`
(DDP on the query network, NCCL on CUDA and gloo on CPU, rank 0 reports and
writes; ``out`` holds the encoder, ``<stem>.state.safetensors`` the query and
key networks, queues and optimizer; ``resume_from`` continues).
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from napari_fewlabel.data.archive import ArchiveScan, find_scans, read_scan_header
from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.patches3d import (
    HU_WINDOW,
    PatchAugment,
    PreparedScan,
    augmented_patches,
    prepare_scan,
)
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import require_ct_in_hu, segment_lungs
from napari_fewlabel.io.load import load_volume
from napari_fewlabel.losses.drasclr import (
    LocationQueues,
    location_bins,
    location_infonce,
    neighbour_query,
)
from napari_fewlabel.models.checkpoint import (
    ENCODER_ONLY_KEY,
    ModelCard,
    check_output_path,
    load_optimizer_state,
    read_card,
    read_model_tensors,
    save_checkpoint,
    save_encoder_checkpoint,
    state_path,
)
from napari_fewlabel.models.drasclr import DrasCLRConfig, DrasCLREncoder
from napari_fewlabel.models.heads import MLPHead
from napari_fewlabel.train.device import autocast, describe_device, precision_for
from napari_fewlabel.train.events import CancelFlag, Event, Notice
from napari_fewlabel.train.pretrain_base import (
    Ranks,
    TrainingLoop,
    backward_and_step,
    device_for,
    finish_distributed,
    init_distributed,
    lr_factor,
    momentum_update,
    move_optimizer_state,
    run_record,
)

METHOD = "drasclr"
#: Default number of steps (about 30 minutes on 2 CPU cores at the default sizes).
DEFAULT_STEPS = 1000


@dataclass(frozen=True)
class DrasCLRSettings:
    """What DrasCLR learns and how (defaults: the paper's where CPU time allows).

    Attributes
    ----------
    batch_size : int
        Anchor patches per step and process (each with a second view and two
        neighbours: four patches).
    temperature : float
        InfoNCE temperature (DrasCLR: 0.2).
    momentum : float
        Of the key network (DrasCLR: 0.999).
    queue_size : int
        Keys kept per location bin.
    bins_per_axis : int
        The lung box is cut into ``bins_per_axis ** 3`` location bins, one
        queue each (DrasCLR: one queue for each of 581 atlas locations).
    neighbour_weight : float
        Weight of :math:`L_{neighbour}` (DrasCLR: 1).
    neighbour_distance : float
        Distance of the neighbour patches from the anchor, in patch sides.
    projection_dim, hidden_dim : int
        MLP head (DrasCLR: 128-128-128).
    learning_rate, weight_decay : float
        AdamW, 10 warm-up steps then cosine decay.
    augment : PatchAugment
    """

    batch_size: int = 16
    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 64
    bins_per_axis: int = 3
    neighbour_weight: float = 1.0
    neighbour_distance: float = 1.0
    projection_dim: int = 128
    hidden_dim: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    augment: PatchAugment = field(default_factory=PatchAugment)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise FewLabelError(f"batch_size must be at least 2, got {self.batch_size}.")
        if not 0 <= self.momentum < 1:
            raise FewLabelError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.temperature <= 0:
            raise FewLabelError(f"temperature must be positive, got {self.temperature}.")
        if self.queue_size < 1 or self.bins_per_axis < 1:
            raise FewLabelError("queue_size and bins_per_axis must be at least 1.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    def differences_from_paper(self, config: DrasCLRConfig) -> list[str]:
        """Where these settings depart from DrasCLR as published."""
        out = [
            "locations are patch centres in the lung's bounding box scaled to [-1, 1]^3 "
            "(paper: coordinates after registration to an atlas)",
            f"one negative queue per bin of a {self.bins_per_axis}^3 grid over the lung box, "
            f"{self.queue_size} keys each (paper: per atlas location)",
            "neighbours are the patches one patch side away in two random directions (paper: "
            "the two nearest atlas locations)",
            "GroupNorm instead of BatchNorm",
            f"AdamW lr {self.learning_rate} with warm-up and cosine decay",
        ]
        if config.patch_size != 32 or config.patch_spacing_mm != 1.0:
            out.append(
                f"{config.patch_size}^3 patches at {config.patch_spacing_mm:g} mm (paper: 32^3 at 1 mm)"
            )
        if config.widths != DrasCLRConfig().widths or config.experts != 8:
            out.append(
                f"widths {list(config.widths)}, {config.experts} experts (paper: 8/8/16/32/64/128, 8)"
            )
        if self.momentum != 0.999:
            out.append(f"momentum {self.momentum} (paper: 0.999)")
        return out


@dataclass(frozen=True)
class DrasCLRPretrainJob:
    """Everything a DrasCLR pretraining run needs.

    Attributes
    ----------
    data : tuple of path
        Chest CT files and folders (in HU).
    out : Path
        Encoder checkpoint to write (``.safetensors``).
    settings : DrasCLRSettings
    architecture : DrasCLRConfig
    steps : int
    time_budget_s : float, optional
        Stop after this many seconds (the schedule then follows the clock).
    device : str
    seed : int
    checkpoint_every : int
        Steps between checkpoints.
    resume_from : Path, optional
        An earlier run's encoder or state file.
    cache_scans : int
        Prepared scans (lung box at the patch spacing) kept in memory at most.
    half : bool
        Store the encoder in float16.
    """

    data: tuple[str | Path, ...]
    out: Path
    settings: DrasCLRSettings = field(default_factory=DrasCLRSettings)
    architecture: DrasCLRConfig = field(default_factory=DrasCLRConfig)
    steps: int = DEFAULT_STEPS
    time_budget_s: float | None = None
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    resume_from: Path | None = None
    cache_scans: int = 4
    half: bool = False


class DrasCLRNetwork(nn.Module):
    """Encoder + MLP head: ``forward(patches, locations)`` -> unit embeddings ``(B, D)``."""

    def __init__(self, config: DrasCLRConfig, settings: DrasCLRSettings) -> None:
        super().__init__()
        self.encoder = DrasCLREncoder(config)
        self.head = MLPHead(config.feature_dim, settings.hidden_dim, settings.projection_dim)

    def forward(self, patches: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(patches, locations))


class LungPatchArchive:
    """Chest CTs read lazily, with lung masks kept and prepared lung boxes cached (LRU).

    Parameters
    ----------
    scans : list of ArchiveScan
        From headers only.
    config : DrasCLRConfig
    margin : int
        Grid voxels kept around the lung box (:meth:`PatchAugment.margin`).
    cache_scans : int
    """

    def __init__(
        self, scans: list[ArchiveScan], config: DrasCLRConfig, margin: int, cache_scans: int
    ) -> None:
        self.scans = scans
        self.config = config
        self.margin = margin
        self.cache_scans = max(1, cache_scans)
        self._lungs: dict[int, tuple[np.ndarray, tuple[int, ...]]] = {}
        self._prepared: OrderedDict[int, PreparedScan] = OrderedDict()
        self.loads = 0

    def prepared(self, index: int) -> PreparedScan:
        """The scan's lung box at the patch spacing (read and segmented on first use)."""
        if index in self._prepared:
            self._prepared.move_to_end(index)
            return self._prepared[index]
        path = self.scans[index].path
        volume = load_volume(path)
        self.loads += 1
        try:
            require_ct_in_hu(volume)
            if index in self._lungs:
                packed, shape = self._lungs[index]
                lung = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
            else:
                lung = segment_lungs(volume).labels > 0
                self._lungs[index] = (np.packbits(lung), lung.shape)
            prepared = prepare_scan(
                volume, lung, spacing_mm=self.config.patch_spacing_mm, margin_voxels=self.margin
            )
        except FewLabelError as e:
            raise FewLabelError(f"{path}: {e} (or remove it from the pretraining data)") from e
        self._prepared[index] = prepared
        while len(self._prepared) > self.cache_scans:
            self._prepared.popitem(last=False)
        return prepared

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"file": s.path.name, "shape_zyx": list(s.shape), "spacing_mm_zyx": list(s.spacing_mm)}
            for s in self.scans
        ]


@dataclass(frozen=True)
class _Batch:
    anchors: torch.Tensor  # (B, 1, P, P, P) first view
    keys: torch.Tensor  # (B, 1, P, P, P) second view
    neighbours: torch.Tensor  # (2B, 1, P, P, P): first neighbours, then second
    anchor_locations: torch.Tensor  # (B, 3)
    key_locations: torch.Tensor
    neighbour_locations: torch.Tensor  # (2B, 3)
    bins: torch.Tensor  # (B,)


def _draw_batch(
    archive: LungPatchArchive,
    shard: list[int],
    settings: DrasCLRSettings,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> _Batch:
    p = archive.config.patch_size
    b = settings.batch_size
    chosen_scans = rng.choice(shard, size=min(2, len(shard)), replace=False)
    parts: list[dict[str, torch.Tensor]] = []
    for i, scan in enumerate(chosen_scans):
        n = b // len(chosen_scans) + (1 if i < b % len(chosen_scans) else 0)
        prep = archive.prepared(int(scan))
        centres = prep.lung_voxels[rng.integers(0, len(prep.lung_voxels), n)].astype(np.float64)
        centres += rng.uniform(-1, 1, centres.shape)
        directions = rng.standard_normal((2, n, 3))
        directions /= np.linalg.norm(directions, axis=2, keepdims=True)
        neighbours = np.clip(
            centres[None] + directions * settings.neighbour_distance * p,
            prep.box_low,
            prep.box_high,
        ).reshape(2 * n, 3)

        anchors, anchor_locations = augmented_patches(prep, centres, p, settings.augment, generator)
        keys, key_locations = augmented_patches(prep, centres, p, settings.augment, generator)
        neighbour_patches, neighbour_locations = augmented_patches(
            prep, neighbours, p, settings.augment, generator
        )
        parts.append(
            {
                "anchors": anchors,
                "keys": keys,
                "nb1": neighbour_patches[:n],
                "nb2": neighbour_patches[n:],
                "anchor_locations": anchor_locations,
                "key_locations": key_locations,
                "nb1_locations": neighbour_locations[:n],
                "nb2_locations": neighbour_locations[n:],
                "bins": location_bins(prep.locations(centres), settings.bins_per_axis),
            }
        )

    def cat(name: str) -> torch.Tensor:
        return torch.cat([part[name] for part in parts])

    return _Batch(
        anchors=cat("anchors"),
        keys=cat("keys"),
        neighbours=torch.cat([cat("nb1"), cat("nb2")]),
        anchor_locations=cat("anchor_locations"),
        key_locations=cat("key_locations"),
        neighbour_locations=torch.cat([cat("nb1_locations"), cat("nb2_locations")]),
        bins=cat("bins"),
    )


def run(job: DrasCLRPretrainJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Pretrain the DrasCLR encoder on ``job.data``; yields Notice/Progress and one final Done.

    Under torchrun only rank 0 yields events; the other ranks train silently.

    Raises
    ------
    FewLabelError
        For problems with the inputs (raised before training starts, or when a
        scan turns out not to be a chest CT in HU when it is first read).
    """
    out = check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    ranks = init_distributed(job.device)
    try:
        yield from _train(job, out, ranks, cancel)
    finally:
        finish_distributed(ranks)


def _train(
    job: DrasCLRPretrainJob, out: Path, ranks: Ranks, cancel: CancelFlag | None
) -> Iterator[Event]:
    settings, config = job.settings, job.architecture
    device = device_for(job.device, ranks)
    device_text = describe_device(device)
    precision = precision_for(device)
    scans = [read_scan_header(p) for p in find_scans(job.data)]
    archive = LungPatchArchive(
        scans, config, settings.augment.margin(config.patch_size), job.cache_scans
    )
    shard = list(range(len(scans)))
    if len(scans) >= ranks.world_size:
        shard = shard[ranks.rank :: ranks.world_size]

    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed + 1000 * ranks.rank)
    rng = np.random.default_rng(job.seed + 1000 * ranks.rank)
    query = DrasCLRNetwork(config, settings)
    key = copy.deepcopy(query).requires_grad_(False)
    queues = LocationQueues(settings.bins_per_axis**3, settings.queue_size, settings.projection_dim)
    optimizer = torch.optim.AdamW(
        query.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    step0, train_seconds0 = 0, 0.0
    if job.resume_from is not None:
        step0, train_seconds0 = _resume(job, query, key, queues, optimizer)
    query.to(device).train()
    key.to(device).train()
    queues.to(device)
    move_optimizer_state(optimizer, device)
    model: nn.Module = query
    if ranks.world_size > 1:
        model = DistributedDataParallel(
            query, device_ids=[device.index] if device.type == "cuda" else None
        )
    scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None
    global_batch = settings.batch_size * ranks.world_size

    if ranks.is_main:
        if step0:
            yield Notice(f"Resuming from {Path(job.resume_from or '').name} at step {step0}.")
        yield Notice(
            f"Pretraining (drasclr) on {device_text} ({precision.name}) x {ranks.world_size} "
            f"process(es): {len(scans)} scans, {config.patch_size}^3 patches at "
            f"{config.patch_spacing_mm:g} mm, {settings.batch_size} anchors per process and step, "
            f"{queues.bins} location queues of {settings.queue_size} keys, {job.steps} steps."
        )

    start = time.perf_counter()
    figures: dict[str, float] = {}

    def progress_at(step: int) -> float:
        p = step / job.steps
        if job.time_budget_s is not None:
            p = max(p, (time.perf_counter() - start) / job.time_budget_s)
        return min(1.0, p)

    def card_for(steps_done: int) -> ModelCard:
        return ModelCard(
            architecture={**config.to_dict(), ENCODER_ONLY_KEY: True},
            classes=default_classes(2),  # an encoder has no classes; the card asks for two
            modality="CT",
            normalization=NormalizationConfig("ct_window", window_hu=HU_WINDOW),
            input_size=(config.patch_size, config.patch_size),
            training={
                "kind": "pretrained encoder",
                "method": "DrasCLR: anatomy-specific MoCo on 3D lung patches with "
                "location-conditioned CondConv3D (L_local + L_neighbour, a negative queue "
                "per location)",
                "differences_from_paper": settings.differences_from_paper(config),
                "settings": settings.to_dict(),
                "data": {
                    "scans": archive.describe(),
                    "normalization": "HU clipped to [-1024, 240] -> [-1, 1]",
                    "locations": "patch centre in the lung bounding box, [-1, 1]^3 (z, y, x)",
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
                **figures,
            },
        )

    def save(steps_done: int) -> Path:
        card = card_for(steps_done)
        state = nn.ModuleDict({"query": query, "key": key, "queues": queues})
        save_checkpoint(state_path(out), state, card, optimizer=optimizer)
        return save_encoder_checkpoint(out, query.encoder, card, half=job.half)

    def train_step(batch: _Batch, step: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * lr_factor(step, progress_at(step))
        b = batch.anchors.shape[0]
        patches = torch.cat([batch.anchors, batch.neighbours]).to(device)
        locations = torch.cat([batch.anchor_locations, batch.neighbour_locations]).to(device)
        bins = batch.bins.to(device)
        with autocast(device, precision):
            z = model(patches, locations)
            with torch.no_grad():
                keys = key(batch.keys.to(device), batch.key_locations.to(device)).float()
            negatives = queues.negatives(bins)
            local = location_infonce(z[:b], keys, negatives, temperature=settings.temperature)
            nb = neighbour_query(z[b : 2 * b], z[2 * b :])
            neighbour = location_infonce(nb, keys, negatives, temperature=settings.temperature)
            loss = local + settings.neighbour_weight * neighbour
        backward_and_step(loss, optimizer, scaler)
        # After the backward pass: the loss's graph holds the queues as they were.
        queues.enqueue(keys, bins)
        momentum_update(query, key, settings.momentum)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FewLabelError(
                "Pretraining diverged (the loss became NaN/Inf): lower the learning rate."
            )
        return {
            "total": value,
            "local": float(local.detach()),
            "neighbour": float(neighbour.detach()),
        }

    def after_step(step: int, per_step: float) -> None:
        figures["patches_per_s"] = round(4 * global_batch / per_step, 2)
        figures["scan_loads"] = float(archive.loads)

    yield from TrainingLoop(
        steps=job.steps,
        step0=step0,
        one_step=lambda step: train_step(
            _draw_batch(archive, shard, settings, rng, generator), step
        ),
        after_step=after_step,
        figures=figures,
        save=save,
        checkpoint_every=job.checkpoint_every,
        ranks=ranks,
        device=device,
        device_text=device_text,
        state_file=state_path(out),
        queue_keys_seen=lambda: int(queues.keys_seen),
        start=start,
        train_seconds0=train_seconds0,
        time_budget_s=job.time_budget_s,
    ).run(cancel)


def _resume(
    job: DrasCLRPretrainJob,
    query: DrasCLRNetwork,
    key: DrasCLRNetwork,
    queues: LocationQueues,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, float]:
    """Load the training state into the fresh objects; return (steps done, seconds trained)."""
    assert job.resume_from is not None
    path = state_path(job.resume_from)
    if not path.is_file():
        raise FewLabelError(
            f"No training state {path.name} next to {Path(job.resume_from).name}: resume from "
            "the files an earlier `fewlabel pretrain --method drasclr` wrote (both must be there)."
        )
    card = read_card(path)
    try:
        same = DrasCLRConfig.from_dict(card.architecture) == job.architecture
    except FewLabelError:
        same = False
    if not same:
        raise FewLabelError(
            f"{path.name} was pretrained with another method or network: resume with the same "
            "--method and patch settings, or start a new run."
        )
    state = nn.ModuleDict({"query": query, "key": key, "queues": queues})
    try:
        state.load_state_dict(read_model_tensors(path), strict=True)
    except RuntimeError as e:
        raise FewLabelError(
            f"{path.name} does not match these settings ({str(e).splitlines()[0]}): resume "
            "with the same settings (queue size, bins, head), or start a new run."
        ) from e
    optimizer_state = load_optimizer_state(path)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return int(card.training.get("steps_done", 0)), float(card.training.get("train_seconds", 0.0))


def with_overrides(settings: DrasCLRSettings, **changes: Any) -> DrasCLRSettings:
    """``settings`` with the given fields changed, ignoring the ones given as None."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
