"""3D CT patches at anatomical locations (DrasCLR): lung box, resampling, augmentation.

A scan is prepared once (:func:`prepare_scan`): the lung mask (from
:func:`~napari_fewlabel.infer.lungs.segment_lungs`, or given) gives the lung's
bounding box; that box, with a margin of half a patch plus the largest
augmentation shift, is cut from the CT and resampled (trilinear) to isotropic
voxels of the patch spacing, and the HU values are mapped to [-1, 1]
(:func:`normalize_hu`). Patches are then cubes of ``patch_size`` voxels
sampled from that grid with :func:`torch.nn.functional.grid_sample`, which
applies a random affine transform at no extra cost (:func:`sample_patches`).

Locations
    The patch centre in the lung's bounding box, scaled to [-1, 1] along
    ``(z, y, x)`` (-1 = the lowest / most anterior / rightmost lung voxel of
    the box in display orientation, +1 the opposite side), what conditions the
    DrasCLR encoder. DrasCLR registers scans to an atlas and uses atlas
    coordinates; the lung box is the registration-free stand-in.

Intensity
    HU clipped to [-1024, 240] and mapped linearly to [-1, 1]:
    ``x -> (x + 1024) / 632 - 1``. Voxels outside the scan read as -1 (air).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io.volume import Volume

#: The HU window of DrasCLR's normalisation.
HU_WINDOW = (-1024.0, 240.0)


def normalize_hu(hu: torch.Tensor | np.ndarray) -> torch.Tensor:
    """HU clipped to [-1024, 240] and mapped to [-1, 1]: ``(x + 1024) / 632 - 1``."""
    x = torch.as_tensor(hu, dtype=torch.float32)
    low, high = HU_WINDOW
    return (x.clamp(low, high) - low) / ((high - low) / 2) - 1


@dataclass(frozen=True)
class PatchAugment:
    """Random augmentation of a patch (DrasCLR: affine, Gaussian noise, contrast).

    Attributes
    ----------
    translate : float
        Largest shift of the patch centre along each axis, as a fraction of
        the patch side (DrasCLR: 12 voxels of 32 = 0.375).
    rotate_deg : float
        Largest rotation about each axis, degrees (DrasCLR: 10).
    scale : float
        Largest relative change of size (DrasCLR: 0.1).
    noise_std : float
        Standard deviation of added Gaussian noise, in normalised units
        (1 unit = 632 HU).
    contrast : float
        Largest relative change of contrast about the patch mean.
    flip : bool
        Random flips along each axis (off in DrasCLR: left and right lungs differ).
    """

    translate: float = 0.375
    rotate_deg: float = 10.0
    scale: float = 0.1
    noise_std: float = 0.02
    contrast: float = 0.1
    flip: bool = False

    @classmethod
    def none(cls) -> PatchAugment:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def margin(self, patch_size: int) -> int:
        """Voxels a prepared grid needs around the lung box so transformed patches stay inside."""
        half = patch_size / 2
        reach = half * math.sqrt(3) * (1 + self.scale) + self.translate * patch_size
        return math.ceil(reach) + 1


@dataclass(frozen=True, eq=False)
class PreparedScan:
    """A CT's lung region on an isotropic grid, ready for patch sampling.

    Attributes
    ----------
    grid : Tensor, shape (D, H, W)
        Normalised intensities (see :func:`normalize_hu`) at ``spacing_mm``.
    lung : ndarray of bool, shape (D, H, W)
        The lung mask on ``grid``.
    box_low, box_high : ndarray, shape (3,)
        The lung's bounding box in ``grid`` voxel coordinates (first and last voxel).
    start, step : ndarray, shape (3,)
        ``grid`` voxel ``g`` lies at voxel ``start + g * step`` of the scan (display order).
    spacing_mm : float
    lung_voxels : ndarray of int, shape (N, 3)
        A subsample of ``lung``'s voxels (every other voxel along each axis),
        for drawing patch centres.
    """

    grid: torch.Tensor
    lung: np.ndarray
    box_low: np.ndarray
    box_high: np.ndarray
    start: np.ndarray
    step: np.ndarray
    spacing_mm: float
    lung_voxels: np.ndarray

    def to_grid(self, scan_voxels: np.ndarray) -> np.ndarray:
        """Scan voxel coordinates ``(..., 3)`` -> grid voxel coordinates."""
        return (np.asarray(scan_voxels, dtype=np.float64) - self.start) / self.step

    def locations(self, grid_voxels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Grid voxel coordinates ``(N, 3)`` -> locations in the lung box, ``[-1, 1]^3``."""
        g = torch.as_tensor(np.asarray(grid_voxels, dtype=np.float64))
        low = torch.as_tensor(self.box_low, dtype=torch.float64)
        extent = torch.as_tensor(np.maximum(self.box_high - self.box_low, 1.0))
        return ((g - low) / extent * 2 - 1).clamp(-1, 1).float()

    @property
    def nbytes(self) -> int:
        return int(self.grid.numel() * 4 + self.lung.size + self.lung_voxels.nbytes)


def prepare_scan(
    scan: Volume,
    lung: np.ndarray,
    *,
    spacing_mm: float,
    margin_voxels: int,
) -> PreparedScan:
    """Cut the lung box (plus a margin) from ``scan`` and resample it to ``spacing_mm``.

    Parameters
    ----------
    scan : Volume
        CT in HU, ``(z, y, x)``.
    lung : ndarray of bool, shape (z, y, x)
        Lung mask on ``scan``'s grid.
    spacing_mm : float
        Isotropic voxel size of the result.
    margin_voxels : int
        Voxels (at ``spacing_mm``) kept around the lung box.

    Raises
    ------
    FewLabelError
        When the lung mask is empty.
    """
    lung = np.asarray(lung, dtype=bool)
    if lung.shape != scan.shape:
        raise FewLabelError(
            f"The lung mask has shape {lung.shape} but the scan {scan.shape}: give lungs "
            "segmented on this scan."
        )
    if not lung.any():
        raise FewLabelError("The lung mask is empty: give a chest CT that shows the lungs.")
    spacing = np.asarray(scan.spacing_mm, dtype=np.float64)
    nonzero = np.nonzero(lung)
    low = np.array([a.min() for a in nonzero], dtype=np.float64)
    high = np.array([a.max() for a in nonzero], dtype=np.float64)
    step = spacing_mm / spacing  # scan voxels per grid voxel
    # Grid voxel g is at scan voxel start + g * step; the lung box starts margin voxels in.
    start = low - margin_voxels * step
    size = np.ceil((high - low) / step).astype(int) + 1 + 2 * margin_voxels
    grid = _resample(scan.array, start, step, size, fill=HU_WINDOW[0])
    lung_grid = _resample(lung.astype(np.float32), start, step, size, fill=0.0) >= 0.5
    if not lung_grid.any():  # a lung thinner than one grid voxel
        raise FewLabelError(
            f"The lungs vanish at {spacing_mm} mm voxels: use a smaller patch spacing."
        )
    box = np.nonzero(lung_grid.numpy())
    voxels = np.stack(np.nonzero(lung_grid.numpy()[::2, ::2, ::2]), axis=1) * 2
    return PreparedScan(
        grid=normalize_hu(grid),
        lung=lung_grid.numpy(),
        box_low=np.array([a.min() for a in box], dtype=np.float64),
        box_high=np.array([a.max() for a in box], dtype=np.float64),
        start=start,
        step=step,
        spacing_mm=float(spacing_mm),
        lung_voxels=voxels.astype(np.int32),
    )


def _resample(
    array: np.ndarray, start: np.ndarray, step: np.ndarray, size: np.ndarray, *, fill: float
) -> torch.Tensor:
    """``array`` at scan voxels ``start + g * step`` for grid voxels ``g < size`` (trilinear)."""
    lo = np.maximum(np.floor(start).astype(int), 0)
    hi = np.minimum(np.ceil(start + (size - 1) * step).astype(int) + 2, array.shape)
    crop = torch.as_tensor(np.ascontiguousarray(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]))
    crop = crop.float()[None, None]
    axes = [
        torch.as_tensor(start[i] + np.arange(size[i]) * step[i] - lo[i], dtype=torch.float32)
        for i in range(3)
    ]
    # grid_sample's normalised coordinates (align_corners=True): -1 and 1 are the end voxels.
    norm = [2 * a / max(crop.shape[2 + i] - 1, 1) - 1 for i, a in enumerate(axes)]
    out = torch.empty(tuple(int(s) for s in size), dtype=torch.float32)
    for z0 in range(0, int(size[0]), 32):  # in slabs, so the sampling grid stays small
        zz, yy, xx = torch.meshgrid(norm[0][z0 : z0 + 32], norm[1], norm[2], indexing="ij")
        sample_grid = torch.stack([xx, yy, zz], dim=-1)[None]
        out[z0 : z0 + 32] = (
            F.grid_sample(
                crop - fill, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )[0, 0]
            + fill
        )
    return out


def random_transforms(
    n: int, augment: PatchAugment, patch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random linear maps ``(n, 3, 3)`` and shifts ``(n, 3)`` (grid voxels)."""
    angles = (torch.rand(n, 3, generator=generator) * 2 - 1) * math.radians(augment.rotate_deg)
    scales = 1 + (torch.rand(n, 1, generator=generator) * 2 - 1) * augment.scale
    matrices = _rotation(angles) * scales[:, :, None]
    if augment.flip:
        signs = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0)
        matrices = matrices * signs[:, None, :]
    shifts = (torch.rand(n, 3, generator=generator) * 2 - 1) * augment.translate * patch_size
    return matrices, shifts


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(n, 3, 3)`` from angles about the three axes ``(n, 3)``."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rz = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rx = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def sample_patches(
    prepared: PreparedScan,
    centres: np.ndarray | torch.Tensor,
    patch_size: int,
    *,
    matrices: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cubic patches ``(N, 1, P, P, P)`` around grid voxel ``centres`` ``(N, 3)``.

    With ``matrices`` and ``shifts`` (from :func:`random_transforms`) the
    sampling lattice of each patch is transformed: voxel offset ``o`` from the
    centre is read at ``centre + shift + matrix @ o``.
    """
    c = torch.as_tensor(np.asarray(centres, dtype=np.float32)).reshape(-1, 3)
    n = c.shape[0]
    offsets = torch.arange(patch_size, dtype=torch.float32) - (patch_size - 1) / 2
    lattice = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), dim=-1)
    lattice = lattice.reshape(1, -1, 3).expand(n, -1, -1)
    if matrices is not None:
        lattice = lattice @ matrices.transpose(1, 2)
    points = lattice + c[:, None, :]
    if shifts is not None:
        points = points + shifts[:, None, :]
    sizes = torch.tensor(prepared.grid.shape, dtype=torch.float32)
    norm = 2 * points / (sizes - 1).clamp(min=1) - 1
    grid = norm.flip(-1).reshape(1, n * patch_size, patch_size, patch_size, 3)
    volume = (prepared.grid + 1)[None, None]  # zeros padding then reads as -1 (air)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(n, 1, patch_size, patch_size, patch_size) - 1


def intensity_augment(
    patches: torch.Tensor, augment: PatchAugment, generator: torch.Generator
) -> torch.Tensor:
    """Random contrast about each patch's mean, then Gaussian noise."""
    n = patches.shape[0]
    if augment.contrast:
        factor = 1 + (torch.rand(n, 1, 1, 1, 1, generator=generator) * 2 - 1) * augment.contrast
        mean = patches.mean(dim=(1, 2, 3, 4), keepdim=True)
        patches = (patches - mean) * factor + mean
    if augment.noise_std:
        patches = patches + augment.noise_std * torch.randn(patches.shape, generator=generator).to(
            patches.dtype
        )
    return patches


def augmented_patches(
    prepared: PreparedScan,
    centres: np.ndarray,
    patch_size: int,
    augment: PatchAugment,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented patches ``(n, 1, P, P, P)`` around grid ``centres`` ``(n, 3)``, and the
    locations ``(n, 3)`` of their (shifted) centres."""
    matrices, shifts = random_transforms(len(centres), augment, patch_size, generator)
    patches = sample_patches(prepared, centres, patch_size, matrices=matrices, shifts=shifts)
    patches = intensity_augment(patches, augment, generator)
    return patches, prepared.locations(np.asarray(centres) + shifts.numpy())
