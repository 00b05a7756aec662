"""Emphysema subtype classifier from a few labelled regions of chest CT (DrasCLR downstream).

``run(job)`` is a generator of events (:mod:`napari_fewlabel.train.events`),
like fine-tuning, so it runs in the GUI's background runner, the CLI and the
tests alike: a :class:`Notice`, a :class:`Progress` per step (``phase
"subtypes"``, the cross-entropy and the running accuracy on the training
patches) and one final :class:`Done` with the model file.

What is learned
---------------
The user paints a few regions of one or more CTs with subtype labels
(:data:`~napari_fewlabel.data.classes.EMPHYSEMA_SUBTYPES`: 1 normal lung,
2 centrilobular, 3 paraseptal, 4 panlobular; 0 = not labelled). Each step
draws a batch of 3D patches centred in labelled voxels, the same number from
every labelled class (so a small class is not drowned), augmented
(:class:`~napari_fewlabel.data.patches3d.PatchAugment`: small shift, rotation,
scaling, noise, contrast), each with its location in the lung box. A
:class:`~napari_fewlabel.models.drasclr.SubtypeClassifier` -- the DrasCLR
encoder (from a ``fewlabel pretrain --method drasclr`` checkpoint, or random)
and a small MLP head -- is trained with cross-entropy; the encoder is
fine-tuned too unless ``train_encoder`` is off. The label of a patch is the
label of its centre voxel.

The model (``.safetensors``, encoder + head, with a card naming the classes
it was trained on) is what :func:`napari_fewlabel.infer.subtypes.map_subtypes`
slides over the lungs to make a dense map.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_fewlabel import __version__
from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.patches3d import HU_WINDOW, PatchAugment, augmented_patches, prepare_scan
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import LungMasks, require_ct_in_hu, segment_lungs
from napari_fewlabel.infer.subtypes import SUBTYPE_TASK
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import (
    ModelCard,
    check_output_path,
    read_card,
    read_model_tensors,
    save_checkpoint,
)
from napari_fewlabel.models.drasclr import DrasCLRConfig, SubtypeClassifier
from napari_fewlabel.models.registry import resolve_model
from napari_fewlabel.train.device import describe_device, resolve_device
from napari_fewlabel.train.events import CancelFlag, Done, Event, Notice, Progress
from napari_fewlabel.train.pretrain_base import hardware_text, lr_factor

#: Steps of the default run (about a minute on one CPU core with 12^3 patches; on the
#: synthetic phantom 600 steps gave every subtype Dice > 0.7 on three seeds, 300 on two).
DEFAULT_STEPS = 600


@dataclass(frozen=True)
class SubtypeSettings:
    """How the classifier is trained.

    Attributes
    ----------
    batch_size : int
        Patches per step (rounded to a multiple of the number of labelled classes).
    learning_rate : float
        AdamW learning rate of the head; warm-up over 10 steps, cosine decay.
    encoder_learning_rate : float
        Of the encoder (when ``train_encoder``); lower than the head's when it
        starts from a pretrained encoder.
    train_encoder : bool
        Fine-tune the encoder too (otherwise only the head learns, on fixed
        DrasCLR features).
    weight_decay : float
    hidden_dim : int
        Hidden width of the head.
    location_noise : float
        Standard deviation of Gaussian noise added to the training patches'
        locations (in lung-box units, which span 2): with a few labelled
        regions, the location-conditioned encoder would otherwise learn
        *where* the labels were painted instead of what the patterns look like.
    augment : PatchAugment
        Shifts up to a quarter of the patch side: the patch's label is its centre's, so
        larger shifts would blur the classes' borders.
    """

    batch_size: int = 16
    learning_rate: float = 2e-3
    encoder_learning_rate: float = 1e-3
    train_encoder: bool = True
    weight_decay: float = 1e-4
    hidden_dim: int = 64
    location_noise: float = 0.3
    augment: PatchAugment = field(
        default_factory=lambda: PatchAugment(
            translate=0.25, rotate_deg=10.0, scale=0.1, noise_std=0.02, contrast=0.1
        )
    )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


@dataclass(frozen=True, eq=False)
class SubtypeJob:
    """Everything a subtype training run needs.

    Attributes
    ----------
    scans : tuple of Volume
        Chest CTs in HU.
    labels : tuple of Volume
        One label map per scan, on its grid: 0 unlabelled, 1-4 the subtypes
        of :data:`~napari_fewlabel.data.classes.EMPHYSEMA_SUBTYPES`.
    out : Path
        Model file to write (``.safetensors``).
    encoder : str or Path, optional
        A DrasCLR encoder (``fewlabel pretrain --method drasclr``; a path or a
        registry name) to start from; None: a random encoder of ``architecture``.
    architecture : DrasCLRConfig
        The network when starting from random (an encoder's card decides
        otherwise); by default DrasCLR's widths with 12^3 patches at 2 mm
        (24 mm; DrasCLR: 32^3 at 1 mm), which separated the subtypes of the
        synthetic phantom best and classifies 7x fewer voxels per patch.
    lungs : tuple of LungMasks, optional
        Lung masks of the scans (found with ``segment_lungs`` when not given).
    steps : int
    settings : SubtypeSettings
    device : str
    seed : int
    """

    scans: tuple[Volume, ...]
    labels: tuple[Volume, ...]
    out: Path
    encoder: str | Path | None = None
    architecture: DrasCLRConfig = field(
        default_factory=lambda: DrasCLRConfig(patch_size=12, patch_spacing_mm=2.0)
    )
    lungs: tuple[LungMasks, ...] | None = None
    steps: int = DEFAULT_STEPS
    settings: SubtypeSettings = field(default_factory=SubtypeSettings)
    device: str = "auto"
    seed: int = 0


def check_subtype_labels(scan: Volume, labels: Volume, name: str = "the labels") -> np.ndarray:
    """The label array of ``labels`` as int64 after checking it fits ``scan``.

    Raises
    ------
    FewLabelError
        When the labels are on another grid or hold values other than 0-4.
    """
    if labels.shape != scan.shape or not np.allclose(labels.affine, scan.affine, atol=1e-2):
        raise FewLabelError(
            f"{name} (shape {labels.shape}) are not on the CT's grid (shape {scan.shape}) or "
            "have another voxel-to-world transform: paint the subtype labels on this CT (e.g. "
            "in napari on top of it) and save them with its header."
        )
    array = np.asarray(labels.array)
    if array.dtype.kind == "f" and np.any(array != np.round(array)):
        raise FewLabelError(f"{name} hold non-integer values: give a label map.")
    array = array.astype(np.int64)
    values = set(np.unique(array).tolist())
    allowed = {c.index for c in EMPHYSEMA_SUBTYPES}
    if not values <= allowed:
        names = ", ".join(f"{c.index} {c.name}" for c in EMPHYSEMA_SUBTYPES[1:])
        raise FewLabelError(
            f"{name} hold the values {sorted(values - allowed)}, which are not subtypes: use "
            f"0 for unlabelled voxels and {names}."
        )
    return array


def labelled_subtypes(label_arrays: list[np.ndarray]) -> list[int]:
    """The subtype values labelled anywhere in ``label_arrays``; at least two are needed.

    Raises
    ------
    FewLabelError
        When fewer than two subtypes are labelled.
    """
    present = sorted(set().union(*(set(np.unique(a).tolist()) for a in label_arrays)) - {0})
    if len(present) < 2:
        raise FewLabelError(
            "The labels mark "
            + ("no region" if not present else f"only {EMPHYSEMA_SUBTYPES[present[0]].name}")
            + ": paint a few regions of at least two subtypes (1 normal lung, 2 centrilobular, "
            "3 paraseptal, 4 panlobular) on the CT."
        )
    return present


def load_encoder_config(path: Path) -> tuple[DrasCLRConfig, dict[str, torch.Tensor]]:
    """A DrasCLR encoder checkpoint's architecture and encoder tensors."""
    card = read_card(path)
    config = DrasCLRConfig.from_dict(card.architecture)
    tensors = read_model_tensors(path)
    encoder = {
        k[len("encoder.") :]: v.float() for k, v in tensors.items() if k.startswith("encoder.")
    }
    if not encoder:
        raise FewLabelError(f"{path.name} holds no encoder weights: give a DrasCLR encoder.")
    return config, encoder


def run(job: SubtypeJob, cancel: CancelFlag | None = None) -> Iterator[Event]:
    """Train the subtype classifier; yields Notice/Progress events and one final Done.

    Raises
    ------
    FewLabelError
        Bad inputs (before training starts): not CT, labels on another grid,
        fewer than two labelled subtypes, no lung.
    """
    out = check_output_path(job.out)
    if job.steps < 1:
        raise FewLabelError(f"steps must be at least 1, got {job.steps}.")
    if not job.scans or len(job.scans) != len(job.labels):
        raise FewLabelError("Give one subtype label map per CT (and at least one CT).")
    label_arrays = []
    for i, (scan, labels) in enumerate(zip(job.scans, job.labels, strict=True)):
        require_ct_in_hu(scan)
        label_arrays.append(check_subtype_labels(scan, labels, f"the labels of scan {i + 1}"))
    present = labelled_subtypes(label_arrays)

    config, encoder_state, encoder_text = job.architecture, None, "a random encoder"
    if job.encoder is not None:
        path = resolve_model(str(job.encoder))
        config, encoder_state = load_encoder_config(path)
        encoder_text = f"the DrasCLR encoder {path.name}"
    device = resolve_device(job.device)
    device_text = describe_device(device)
    settings = job.settings

    if job.lungs is not None and (
        len(job.lungs) != len(job.scans)
        or any(lm.labels.shape != s.shape for lm, s in zip(job.lungs, job.scans, strict=False))
    ):
        raise FewLabelError("Give one lung mask per CT, segmented on that CT (or none).")
    lungs = job.lungs or tuple(segment_lungs(scan) for scan in job.scans)
    margin = settings.augment.margin(config.patch_size)
    prepared = [
        prepare_scan(
            scan, lung.labels > 0, spacing_mm=config.patch_spacing_mm, margin_voxels=margin
        )
        for scan, lung in zip(job.scans, lungs, strict=True)
    ]
    # Labelled voxels of each class, as (scan index, grid coordinates).
    centres: dict[int, list[tuple[int, np.ndarray]]] = {c: [] for c in present}
    for i, (array, prep) in enumerate(zip(label_arrays, prepared, strict=True)):
        for c in present:
            voxels = np.argwhere(array == c)
            if voxels.size:
                centres[c].append((i, prep.to_grid(voxels)))
    counts = {c: sum(len(v) for _, v in centres[c]) for c in present}

    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    rng = np.random.default_rng(job.seed)
    network = SubtypeClassifier(config, len(EMPHYSEMA_SUBTYPES) - 1, settings.hidden_dim)
    if encoder_state is not None:
        try:
            network.encoder.load_state_dict(encoder_state, strict=True)
        except RuntimeError as e:
            raise FewLabelError(
                f"The encoder weights do not match its card ({str(e).splitlines()[0]}): the "
                "file is damaged; pretrain it again."
            ) from e
    network.to(device).train()
    network.encoder.requires_grad_(settings.train_encoder)
    groups: list[dict[str, Any]] = [
        {"params": network.head.parameters(), "base": settings.learning_rate}
    ]
    if settings.train_encoder:
        groups.append(
            {"params": network.encoder.parameters(), "base": settings.encoder_learning_rate}
        )
    optimizer = torch.optim.AdamW(
        groups, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    per_class = max(1, settings.batch_size // len(present))
    # Logits of the classes nobody labelled are never trained: they are masked out.
    present_index = torch.tensor([c - 1 for c in present], device=device)

    yield Notice(
        f"Training the emphysema subtype classifier on {device_text} from {encoder_text}: "
        f"{len(job.scans)} scan(s), labelled voxels "
        + ", ".join(f"{EMPHYSEMA_SUBTYPES[c].name} {counts[c]}" for c in present)
        + f"; {config.patch_size}^3 patches at {config.patch_spacing_mm:g} mm, {job.steps} steps."
    )

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches, locations, targets = [], [], []
        for c in present:
            # Scans in proportion to their labelled voxels of this class.
            sizes = np.array([len(v) for _, v in centres[c]], dtype=np.float64)
            picks = rng.choice(len(sizes), size=per_class, p=sizes / sizes.sum())
            for s in np.unique(picks):
                scan_index, voxels = centres[c][s]
                n = int(np.count_nonzero(picks == s))
                chosen = voxels[rng.integers(0, len(voxels), size=n)]
                patch, location = augmented_patches(
                    prepared[scan_index], chosen, config.patch_size, settings.augment, generator
                )
                noise = torch.randn(location.shape, generator=generator) * settings.location_noise
                location = (location + noise).clamp(-1, 1)
                patches.append(patch)
                locations.append(location)
                targets.append(torch.full((n,), c - 1, dtype=torch.long))
        return torch.cat(patches), torch.cat(locations), torch.cat(targets)

    start = time.perf_counter()
    correct: list[float] = []
    losses: dict[str, float] = {}
    step = 0
    cancelled = False
    while step < job.steps:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * lr_factor(step, step / job.steps)
        patches, locations, targets = batch()
        patches, locations, targets = patches.to(device), locations.to(device), targets.to(device)
        logits = network(patches, locations)[:, present_index]
        target_index = torch.searchsorted(present_index, targets)
        loss = F.cross_entropy(logits, target_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FewLabelError(
                "Training diverged (the loss became NaN/Inf): lower the learning rate."
            )
        correct.append(float((logits.argmax(dim=1) == target_index).float().mean()))
        step += 1
        per_step = (time.perf_counter() - start) / step
        losses = {"total": value, "cross_entropy": value}
        yield Progress(
            step=step,
            total=job.steps,
            losses=losses,
            eta_s=(job.steps - step) * per_step,
            device=device_text,
            phase="subtypes",
            extra={"train_accuracy": round(float(np.mean(correct[-20:])), 4)},
        )

    network.eval()
    card = ModelCard(
        architecture={
            **config.to_dict(),
            "task": SUBTYPE_TASK,
            "num_classes": len(EMPHYSEMA_SUBTYPES) - 1,
            "hidden_dim": settings.hidden_dim,
        },
        classes=EMPHYSEMA_SUBTYPES,
        modality="CT",
        normalization=NormalizationConfig("ct_window", window_hu=HU_WINDOW),
        input_size=(config.patch_size, config.patch_size),
        training={
            "kind": "emphysema subtype classifier",
            "method": "DrasCLR downstream: patch classifier (encoder + MLP head) trained with "
            "cross-entropy on patches centred in labelled voxels, class-balanced batches",
            "classes_trained": present,
            "labelled_voxels": {EMPHYSEMA_SUBTYPES[c].name: counts[c] for c in present},
            "encoder": encoder_text,
            "settings": settings.to_dict(),
            "steps_done": step,
            "steps_planned": job.steps,
            "scans": [
                {"shape_zyx": list(s.shape), "spacing_mm_zyx": list(s.spacing_mm)}
                for s in job.scans
            ],
            "device": device_text,
            "hardware": hardware_text(),
            "seed": job.seed,
            "train_seconds": round(time.perf_counter() - start, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    checkpoint = save_checkpoint(out, network, card)
    yield Done(
        checkpoint,
        {
            "steps_done": step,
            "steps_planned": job.steps,
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_losses": dict(losses),
            "train_accuracy": round(float(np.mean(correct[-20:])), 4) if correct else None,
            "classes_trained": present,
            "device": device_text,
            "package_version": __version__,
        },
        cancelled=cancelled,
    )
