"""Where each fine-tuning step's slices come from.

A step draws one plane (:meth:`TrainingBatches.choose_plane`): the labelled
plane, or with ``planes="all"`` one of the two planes across it. On the
labelled plane the labelled batch comes from the painted slices, the slices
marked empty (capped at ``empty_share`` of the draws) and the labelled slices
of extra volumes; the unlabelled batch from every other slice of the scan and
of the extra volumes. On a plane across, both come from its slices
(:class:`~napari_fewlabel.data.planes.CrossPlane`). Held-out validation
slices rejoin the labelled pool when :meth:`TrainingBatches.rejoin_held_out`
is called.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_fewlabel.data.planes import CrossPlane
from napari_fewlabel.train.finetune_data import PreparedData


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


class TrainingBatches:
    """Draws the slices of each step from a job's prepared data.

    Parameters
    ----------
    data : PreparedData
    seed : int
        Seeds the draws of slices and, in a stream of its own, of planes (so a
        run on the labelled plane only draws exactly as it did before planes).
    empty_share : float
        ``FinetuneSettings.empty_share``.
    labelled_plane_share : float
        ``FinetuneSettings.labelled_plane_share``.
    """

    def __init__(
        self, data: PreparedData, seed: int, empty_share: float, labelled_plane_share: float
    ) -> None:
        self.data = data
        self.rng = np.random.default_rng(seed)
        self._plane_rng = np.random.default_rng([seed, 1])
        self.empty_share = empty_share
        self.labelled_plane_share = labelled_plane_share
        self.in_slices = data.architecture.in_slices
        self.labelled_pool = data.labelled
        self.held_out = data.held_out
        self._weights = self._draw_weights()

    def _draw_weights(self) -> np.ndarray | None:
        """Draw probabilities over the pool then the extra labelled slices (None: equal)."""
        is_empty = np.concatenate(
            [
                np.isin(self.labelled_pool, self.data.empty),
                np.zeros(len(self.data.extra_labelled), bool),
            ]
        )
        return labelled_draw_probabilities(is_empty, self.empty_share)

    def rejoin_held_out(self) -> None:
        """The held-out validation slices join the labelled pool."""
        self.labelled_pool = np.union1d(self.labelled_pool, self.held_out)
        self.held_out = np.array([], dtype=np.int64)
        self._weights = self._draw_weights()

    def choose_plane(self) -> CrossPlane | None:
        """The plane of this step's slices: None for the labelled plane."""
        planes = self.data.cross_planes
        if not planes or self._plane_rng.random() < self.labelled_plane_share:
            return None
        return planes[int(self._plane_rng.integers(len(planes)))]

    def labelled(self, n: int, plane: CrossPlane | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labelled windows ``(n, in_slices, H, W)`` and targets ``(n, H, W)`` int64."""
        if plane is not None:
            return plane.labelled_batch(n, self.in_slices, self.rng)
        data, pool = self.data, self.labelled_pool
        # Without weights this is the stream of rng.choice(pool), as before the cap.
        picks = self.rng.choice(len(pool) + len(data.extra_labelled), size=n, p=self._weights)
        if (picks < len(pool)).all():  # all from the scan: one batched read
            centres = pool[picks]
            x = data.stacks[0].windows(torch.from_numpy(centres), self.in_slices)
            y = torch.stack([data.labels_by_slice[int(c)] for c in centres])
            return x, y
        xs, ys = [], []
        for k in picks:
            if k < len(pool):
                s, i, y = 0, int(pool[k]), data.labels_by_slice[int(pool[k])]
            else:
                s, i, y = data.extra_labelled[k - len(pool)]
            xs.append(data.stacks[s].windows(torch.tensor([i]), self.in_slices))
            ys.append(y)
        return torch.cat(xs), torch.stack(ys)

    def unlabelled(self, n: int, plane: CrossPlane | None) -> torch.Tensor:
        """``n`` unlabelled windows ``(n, in_slices, H, W)``."""
        if plane is not None:
            return plane.unlabelled_batch(n, self.in_slices, self.rng)
        data = self.data
        picks = self.rng.integers(0, len(data.unlabelled_pool), size=n)
        windows = [
            data.stacks[s].windows(torch.tensor([i]), self.in_slices)
            for s, i in (data.unlabelled_pool[p] for p in picks)
        ]
        return torch.cat(windows)
