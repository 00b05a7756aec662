"""Events a training job yields: one stream for the GUI, the CLI and the tests.

A job (``train.finetune.run``, ``train.pretrain.run``, ``train.adapt.run``) is a
generator of these small frozen dataclasses. It yields :class:`Progress` after
steps, :class:`Notice` for things the user should read (a fallback taken, a
batch size reduced), :class:`Preview` (fine-tuning with a live preview: the
slices on screen, labelled now), and exactly one :class:`Done` last -- also when it was
cancelled, so the consumer always learns where the last good checkpoint is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np


class CancelFlag(Protocol):
    """Anything with ``is_set()``: ``threading.Event``, ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    """State after a training step.

    Attributes
    ----------
    step, total : int
        Steps done and planned (``total`` may change when a time budget is used).
    losses : mapping of str to float
        Named loss terms of this step (e.g. ``{"supervised": .4, "cps": .1}``).
    val_dice : float or None
        Mean foreground Dice on held-out labelled slices, when evaluated.
    eta_s : float or None
        Estimated seconds to finish.
    device : str
        The torch device in use, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``.
    memory_mb : float or None
        Peak accelerator memory (CUDA) or resident memory of the process (CPU).
    phase : str
        Which job is running ("finetune", "pretrain", "adapt", ...).
    extra : mapping
        Method-specific figures (effective rank, Wasserstein estimate, ...).
    note : str
        A short state worth showing beside the bar ("converged: finishing early").
    """

    step: int
    total: int
    losses: Mapping[str, float]
    val_dice: float | None = None
    eta_s: float | None = None
    device: str = "cpu"
    memory_mb: float | None = None
    phase: str = "finetune"
    extra: Mapping[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Notice:
    """A message for the user (shown as a notification / printed by the CLI)."""

    message: str
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True)
class Done:
    """The job ended; ``checkpoint`` is the last complete checkpoint (or None)."""

    checkpoint: Path | None
    summary: Mapping[str, Any] = field(default_factory=dict)
    cancelled: bool = False


@dataclass(frozen=True)
class Preview:
    """The slices on screen labelled by the model of this moment (live preview).

    Attributes
    ----------
    axis : int
        Data axis of the slices, ``(z, y, x)`` order.
    start : int
        Index of the first slice along ``axis``.
    labels : ndarray, shape (n, h, w), uint8
        Labels of slices ``start .. start + n - 1``, each as ``np.take(volume, i, axis)``.
    step : int
        Training steps done when they were labelled.
    """

    axis: int
    start: int
    labels: np.ndarray
    step: int


Event = Progress | Notice | Done | Preview
