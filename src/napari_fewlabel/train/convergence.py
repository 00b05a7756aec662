"""Stop when done: notice that fine-tuning has converged, so easy scans finish early.

A fine-tuning run has a step budget (``steps``, 300 by default) that hard scans
need; an easy scan's model stops changing long before. Two signals that cost
no label say so:

* the **stream agreement**: the share of unlabelled pixels on which the two
  decoders give the same class (:func:`~.finetune_scores.stream_agreement`),
  measured every ``validate_every`` steps. Cross pseudo-supervision pushes it
  up while the streams still learn from each other; once it is high and flat,
  the unlabelled term has nothing left to teach;
* the **supervised loss** on the labelled slices, averaged over the steps
  between two measurements: flat when the labelled slices are learnt.

:class:`ConvergenceWatch` says the run has converged when, after the
unlabelled term has started (``progress >= min_progress``), the last
``window`` agreements are all at least ``min_agreement`` and within
``max_spread`` of each other, and the mean supervised loss fell by less than
``max_loss_drop`` (relative) between the last two measurement intervals.

The run then does not stop dead: the training schedule (learning-rate decay,
the unlabelled term's ramp) is a function of the progress through the run,
and the remaining part of it is run ``speedup`` times faster, so the model
still ends on a decayed learning rate (:class:`~.finetune._Clock`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from napari_fewlabel.errors import FewLabelError


@dataclass(frozen=True)
class ConvergenceRule:
    """When a fine-tuning run counts as converged (see the module docstring).

    Attributes
    ----------
    min_agreement : float
        Every agreement in the window is at least this.
    max_spread : float
        Highest minus lowest agreement in the window at most this.
    window : int
        Agreement measurements looked at (``validate_every`` steps apart).
    max_loss_drop : float
        The mean supervised loss of the last interval is at least
        ``1 - max_loss_drop`` times that of the interval before.
    min_progress : float
        Not before this fraction of the run (the unlabelled term starts after
        the supervised warm-up).
    speedup : float
        How much faster the rest of the schedule runs once converged.
    """

    min_agreement: float = 0.95
    max_spread: float = 0.02
    window: int = 3
    max_loss_drop: float = 0.10
    min_progress: float = 0.4
    speedup: float = 2.0

    def __post_init__(self) -> None:
        if self.window < 1 or self.speedup < 1:
            raise FewLabelError(
                f"The convergence window must be at least 1 check and the speed-up at least 1, "
                f"got {self.window} and {self.speedup}."
            )
        for name in ("min_agreement", "max_spread", "max_loss_drop", "min_progress"):
            if not 0 <= getattr(self, name) <= 1:
                raise FewLabelError(f"{name} is a fraction: give a value in [0, 1].")


class ConvergenceWatch:
    """Collects the run's signals and says once when it has converged.

    >>> watch = ConvergenceWatch(ConvergenceRule(window=2))
    >>> said = []
    >>> for step in range(1, 101):
    ...     watch.add_loss(0.2)
    ...     if step % 25 == 0 and watch.check(agreement=0.97, progress=step / 100):
    ...         said.append(step)
    >>> said  # once, at the first check from 40 % of the run with two agreements
    [50]
    """

    def __init__(self, rule: ConvergenceRule) -> None:
        self.rule = rule
        self.agreements: deque[float] = deque(maxlen=rule.window)
        self.interval_losses: deque[float] = deque(maxlen=2)
        self._losses: list[float] = []
        self.converged = False

    def add_loss(self, supervised_loss: float) -> None:
        """The supervised loss of one step."""
        self._losses.append(float(supervised_loss))

    def check(self, agreement: float | None, progress: float) -> str | None:
        """At a measurement: the reason the run has converged (once), else None."""
        if self._losses:
            self.interval_losses.append(sum(self._losses) / len(self._losses))
            self._losses = []
        if agreement is None or self.converged:
            return None
        self.agreements.append(float(agreement))
        r = self.rule
        if progress < r.min_progress or len(self.agreements) < r.window:
            return None
        low, high = min(self.agreements), max(self.agreements)
        if low < r.min_agreement or high - low > r.max_spread:
            return None
        if len(self.interval_losses) < 2:
            return None
        before, last = self.interval_losses
        if before > 0 and last < (1 - r.max_loss_drop) * before:
            return None
        self.converged = True
        span = f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%}-{high:.0%}"
        return (
            f"converged: the streams agree on {span} of unlabelled pixels over "
            f"the last {r.window} checks and the labelled loss is flat"
        )
