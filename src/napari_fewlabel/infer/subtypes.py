"""Dense emphysema subtype maps: a subtype classifier slid over the lungs.

:func:`map_subtypes` prepares the scan as training did (lung box resampled to
the patch spacing, :mod:`napari_fewlabel.data.patches3d`), classifies a patch
centred at every point of a regular lattice (``stride`` patch voxels apart)
whose neighbourhood touches the lung, and interpolates the lattice's class
probabilities (trilinear, weighting patches centred outside the lung a
thousandth as much as those inside) to every lung voxel of the scan's own grid; a lung
voxel gets the most probable subtype among the ones the model was trained
on, every other voxel 0. The share of each subtype is its voxel count over
the lung's, in percent, whole lung and by region
(:data:`~napari_fewlabel.infer.emphysema.REGIONS`).

The map's resolution is the lattice's (``stride * patch_spacing_mm``; 8 mm
by default): borders between subtypes are smooth at that scale, and a
pattern narrower than about half a patch is found only where it dominates
the patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES
from napari_fewlabel.data.patches3d import PatchAugment, prepare_scan, sample_patches
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import LungMasks, require_ct_in_hu, segment_lungs
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import ModelCard, read_card, read_model_tensors
from napari_fewlabel.models.drasclr import DrasCLRConfig, SubtypeClassifier
from napari_fewlabel.train.device import resolve_device

#: ``architecture["task"]`` of a subtype model's card (see :mod:`napari_fewlabel.train.subtypes`).
SUBTYPE_TASK = "emphysema subtypes"


@dataclass(frozen=True, eq=False)
class SubtypeModel:
    """A trained subtype classifier, its card and the label values it was trained on."""

    network: SubtypeClassifier
    card: ModelCard
    config: DrasCLRConfig
    classes_trained: tuple[int, ...]


def load_subtype_model(path: str | Path, *, device: str | torch.device = "cpu") -> SubtypeModel:
    """Load a model written by :func:`napari_fewlabel.train.subtypes.run` (never unpickling).

    Raises
    ------
    FewLabelError
        When the file is not a subtype model (e.g. a DrasCLR encoder or a segmentation model).
    """
    path = Path(path)
    card = read_card(path)
    if card.architecture.get("task") != SUBTYPE_TASK:
        raise FewLabelError(
            f"{path.name} is not an emphysema subtype model: train one with "
            "`fewlabel emphysema CT --out DIR --subtype-labels LABELS.nii.gz` (it writes "
            "subtype_model.safetensors)."
        )
    config = DrasCLRConfig.from_dict(card.architecture)
    network = SubtypeClassifier(
        config, int(card.architecture["num_classes"]), int(card.architecture["hidden_dim"])
    )
    try:
        network.load_state_dict(read_model_tensors(path), strict=True)
    except RuntimeError as e:
        raise FewLabelError(
            f"{path.name}: the weights do not match its model card ({str(e).splitlines()[0]}); "
            "the file is damaged: train it again."
        ) from e
    trained = tuple(int(c) for c in card.training.get("classes_trained", range(1, 5)))
    return SubtypeModel(network.to(device).eval(), card, config, trained)


@dataclass(frozen=True, eq=False)
class SubtypeMap:
    """A dense subtype map and its shares.

    Attributes
    ----------
    labels : ndarray of uint8, shape (z, y, x)
        0 outside the lungs, else the subtype (values of
        :data:`~napari_fewlabel.data.classes.EMPHYSEMA_SUBTYPES`), on the scan's grid.
    lungs : LungMasks
    stride_mm : float
        Distance between classified patch centres.
    patches : int
        Patches classified.
    """

    labels: np.ndarray
    lungs: LungMasks
    stride_mm: float
    patches: int

    def percent(self, mask: np.ndarray | None = None) -> dict[str, float | None]:
        """Share of each subtype in the lung voxels of ``mask`` (all lung by default), in %."""
        region = self.labels[mask] if mask is not None else self.labels[self.labels > 0]
        region = region[region > 0]
        out: dict[str, float | None] = {}
        for c in EMPHYSEMA_SUBTYPES[1:]:
            out[c.name] = (
                round(100.0 * np.count_nonzero(region == c.index) / region.size, 3)
                if region.size
                else None
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        voxel_ml = self.lungs.voxel_ml
        return {
            "classes": {c.index: c.name for c in EMPHYSEMA_SUBTYPES[1:]},
            "percent_of_lung": self.percent(),
            "volume_ml": {
                c.name: round(np.count_nonzero(self.labels == c.index) * voxel_ml, 2)
                for c in EMPHYSEMA_SUBTYPES[1:]
            },
            "stride_mm": self.stride_mm,
            "patches": self.patches,
        }


@torch.no_grad()
def map_subtypes(
    model: SubtypeModel,
    scan: Volume,
    lungs: LungMasks | None = None,
    *,
    stride: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> SubtypeMap:
    """Classify patches over the lungs of ``scan`` and make a dense subtype map.

    Parameters
    ----------
    model : SubtypeModel
    scan : Volume
        Chest CT in HU.
    lungs : LungMasks, optional
        Found with :func:`~napari_fewlabel.infer.lungs.segment_lungs` when not given.
    stride : int, optional
        Patch voxels between classified patch centres (default: a quarter of the patch side).
    batch_size : int
        Patches per forward pass (bounds memory).
    device : str or torch.device

    Raises
    ------
    FewLabelError
        Not CT in HU, no lung, or lungs on another grid.
    """
    require_ct_in_hu(scan)
    if lungs is None:
        lungs = segment_lungs(scan)
    elif lungs.labels.shape != scan.shape:
        raise FewLabelError(
            f"The lung labels have shape {lungs.labels.shape} but the scan has {scan.shape}: "
            "use lungs segmented on this scan."
        )
    lung = lungs.labels > 0
    config = model.config
    p = config.patch_size
    stride = stride or max(1, p // 4)
    if stride < 1:
        raise FewLabelError(f"The stride must be at least 1 voxel, got {stride}.")
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    model.network.to(dev)
    prepared = prepare_scan(
        scan, lung, spacing_mm=config.patch_spacing_mm, margin_voxels=PatchAugment.none().margin(p)
    )
    # Lattice points j * stride whose +-stride neighbourhood holds lung: every lung voxel's
    # interpolation corners are among them.
    lung_grid = torch.from_numpy(prepared.lung).float()[None, None]
    near = (
        F.max_pool3d(lung_grid, kernel_size=2 * stride + 1, stride=stride, padding=stride)[0, 0] > 0
    )
    points = torch.nonzero(near).numpy()
    classes = int(model.card.architecture["num_classes"])
    allowed = torch.full((classes,), float("-inf"))
    allowed[[c - 1 for c in model.classes_trained]] = 0.0
    probabilities = torch.zeros((classes + 1, *near.shape))  # the last: weights
    for first in range(0, len(points), batch_size):
        chunk = points[first : first + batch_size]
        centres = chunk * stride
        patches = sample_patches(prepared, centres, p).to(dev)
        locations = prepared.locations(centres).to(dev)
        logits = model.network(patches, locations).float().cpu() + allowed
        # A patch centred outside the lung (its class never trained) counts a thousandth as much.
        weight = (
            1e-3
            + torch.from_numpy(prepared.lung[centres[:, 0], centres[:, 1], centres[:, 2]]).float()
        )
        probabilities[:-1, chunk[:, 0], chunk[:, 1], chunk[:, 2]] = (
            logits.softmax(dim=1) * weight[:, None]
        ).T
        probabilities[-1, chunk[:, 0], chunk[:, 1], chunk[:, 2]] = weight
    # Every lung voxel of the scan: its lattice coordinates, then trilinear interpolation.
    voxels = np.argwhere(lung)
    lattice = prepared.to_grid(voxels) / stride
    size = np.array(near.shape, dtype=np.float64)
    norm = torch.from_numpy(2 * lattice / np.maximum(size - 1, 1) - 1).float()
    labels = np.zeros(scan.shape, dtype=np.uint8)
    for first in range(0, len(voxels), 1_000_000):
        grid = norm[first : first + 1_000_000].flip(-1).reshape(1, -1, 1, 1, 3)
        sampled = F.grid_sample(
            probabilities[None], grid, mode="bilinear", padding_mode="border", align_corners=True
        )[0, :, :, 0, 0]
        chosen = sampled[:-1].argmax(dim=0).numpy() + 1  # the weight only scales
        v = voxels[first : first + 1_000_000]
        labels[v[:, 0], v[:, 1], v[:, 2]] = chosen
    return SubtypeMap(
        labels=labels,
        lungs=lungs,
        stride_mm=stride * config.patch_spacing_mm,
        patches=len(points),
    )
