"""A per-voxel classifier on 3D filter features (the ilastik idea): an experiment, not the engine.

Smoothed intensities at several scales, their gradient magnitudes and
Laplacians, differences of Gaussians and the voxel's position in the scan
describe each voxel; a small MLP learns the classes from the voxels of the
labelled slices and gives every voxel of the scan class probabilities. This
is what ilastik and napari-convpaint do with a random forest, and on targets
that intensity and position define (grey/white matter, lungs, bone) it is hard
to beat from one slice. ``prior_fusion.py`` averages its probabilities with
our network's to see whether the product should (docs/engine.md).

Everything runs in torch on a grid of at most :data:`MAX_VOXELS` voxels (the
scan block-averaged, never along the labelled axis when it can be avoided), so
a 512x512x600 CT costs the same as a small MRI.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

#: Gaussian scales in voxels of the prior's grid (ilastik's default set).
SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
#: The prior's grid holds at most this many voxels.
MAX_VOXELS = 2_000_000
#: Labelled voxels the classifier trains on at most (classes balanced up to their share).
MAX_TRAINING_VOXELS = 60_000


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of a ``(D, H, W)`` volume, edges replicated."""
    kernel = _gaussian_kernel(sigma)
    r = kernel.numel() // 2
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def _gradient_magnitude(volume: torch.Tensor) -> torch.Tensor:
    grads = torch.gradient(volume) if min(volume.shape) > 1 else [torch.zeros_like(volume)] * 3
    return torch.sqrt(sum(g * g for g in grads))


def _laplacian(volume: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(volume)
    for axis in range(3):
        if volume.shape[axis] < 3:
            continue
        first = torch.gradient(volume, dim=axis)[0]
        out += torch.gradient(first, dim=axis)[0]
    return out


def voxel_features(volume: torch.Tensor) -> torch.Tensor:
    """Features of every voxel of a normalised ``(D, H, W)`` volume: ``(D, H, W, F)`` float32.

    The intensity; per sigma the Gaussian, its gradient magnitude and
    Laplacian; differences of consecutive Gaussians; the position scaled to
    ``[0, 1]`` along each axis.
    """
    volume = volume.float()
    features = [volume]
    smoothed = []
    for sigma in SIGMAS:
        g = _smooth(volume, sigma)
        smoothed.append(g)
        features += [g, _gradient_magnitude(g), _laplacian(g)]
    features += [fine - coarse for fine, coarse in itertools.pairwise(smoothed)]
    for axis, size in enumerate(volume.shape):
        shape = [1, 1, 1]
        shape[axis] = size
        features.append(torch.linspace(0, 1, size).view(shape).expand(volume.shape))
    return torch.stack(features, dim=-1)


def prior_grid_factors(shape: tuple[int, int, int], axis: int) -> tuple[int, int, int]:
    """Integer block sizes that bring ``shape`` under :data:`MAX_VOXELS`, in-plane first."""
    factors = [1, 1, 1]
    while math.prod(math.ceil(s / f) for s, f in zip(shape, factors, strict=True)) > MAX_VOXELS:
        # shrink the axis with the most voxels per block left, preferring in-plane axes
        candidates = sorted(range(3), key=lambda a: (a == axis, -math.ceil(shape[a] / factors[a])))
        factors[candidates[0]] += 1
    return factors[0], factors[1], factors[2]


class FeaturePrior:
    """Class probabilities for every voxel from the labelled voxels and 3D features.

    Parameters
    ----------
    normalised : ndarray, shape (z, y, x), float32
        The scan after intensity normalisation.
    labels : ndarray, shape (z, y, x), int
        The label map; only ``given`` slices along ``axis`` are read.
    axis : int
    given : ndarray of int
        Slices whose labels are known (painted or marked empty).
    num_classes : int
    seed : int
    steps : int
        Adam steps of the classifier (full-batch over the sampled voxels).
    """

    def __init__(
        self,
        normalised: np.ndarray,
        labels: np.ndarray,
        axis: int,
        given: np.ndarray,
        num_classes: int,
        *,
        seed: int = 0,
        steps: int = 300,
    ) -> None:
        self.shape = normalised.shape
        self.factors = prior_grid_factors(normalised.shape, axis)
        grid = torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))
        if self.factors != (1, 1, 1):
            grid = F.avg_pool3d(
                grid[None, None], self.factors, ceil_mode=True, count_include_pad=False
            )[0, 0]
        features = voxel_features(grid)
        self.mean = features.flatten(0, 2).mean(dim=0)
        self.std = features.flatten(0, 2).std(dim=0).clamp_min(1e-6)
        train_x, train_y = self._training_voxels(features, labels, axis, given, seed)
        torch.manual_seed(seed)
        f = features.shape[-1]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(f, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, num_classes),
        )  # fmt: skip
        optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        x = (train_x - self.mean) / self.std
        counts = torch.bincount(train_y, minlength=num_classes).float()
        weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * num_classes), 0)
        for _ in range(steps):
            loss = F.cross_entropy(self.net(x), train_y, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.net.eval()
        with torch.no_grad():
            logits = self.net((features.flatten(0, 2) - self.mean) / self.std)
        # (K, d, h, w) on the prior's grid
        self.probabilities = logits.softmax(dim=1).T.reshape(num_classes, *features.shape[:3])

    def _training_voxels(
        self,
        features: torch.Tensor,
        labels: np.ndarray,
        axis: int,
        given: np.ndarray,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of (a balanced sample of) the labelled voxels."""
        fz, fy, fx = self.factors
        # label of each grid voxel of a labelled slice: the label at the block's first voxel
        grid_given = np.unique(np.asarray(given) // self.factors[axis])
        full_index = np.minimum(grid_given * self.factors[axis], labels.shape[axis] - 1)
        taken = np.take(labels, full_index, axis=axis)
        sub = [slice(None, None, fz), slice(None, None, fy), slice(None, None, fx)]
        sub[axis] = slice(None)
        taken = taken[tuple(sub)]
        feats = torch.index_select(features, axis, torch.from_numpy(grid_given))
        moved_labels = torch.from_numpy(np.moveaxis(taken, axis, 0).astype(np.int64))
        moved_feats = feats.movedim(axis, 0)
        d = min(moved_labels.shape[1], moved_feats.shape[1])
        w = min(moved_labels.shape[2], moved_feats.shape[2])
        y = moved_labels[:, :d, :w].reshape(-1)
        x = moved_feats[:, :d, :w].reshape(-1, features.shape[-1])
        rng = np.random.default_rng(seed)
        present = torch.unique(y).tolist()
        cap = MAX_TRAINING_VOXELS // max(1, len(present))
        keep = []
        for label in present:
            idx = torch.nonzero(y == label).flatten().numpy()
            if idx.size > cap:
                idx = rng.choice(idx, cap, replace=False)
            keep.append(idx)
        pick = torch.from_numpy(np.concatenate(keep))
        return x[pick], y[pick]

    def slices(self, axis: int, indices: np.ndarray) -> torch.Tensor:
        """Probabilities of full-resolution slices along ``axis``: ``(n, K, h, w)``."""
        probs = self.probabilities
        k = probs.shape[0]
        grid_index = torch.from_numpy(np.asarray(indices) // self.factors[axis])
        taken = torch.index_select(probs, axis + 1, grid_index).movedim(axis + 1, 0)
        rows, cols = (a for a in range(3) if a != axis)
        size = (self.shape[rows], self.shape[cols])
        if tuple(taken.shape[2:]) != size:
            taken = F.interpolate(taken, size=size, mode="bilinear", align_corners=False)
        assert taken.shape[1] == k
        return taken
