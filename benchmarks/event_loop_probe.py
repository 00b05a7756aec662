"""A QTimer that fires every few ms and records how late it fires: the GUI's frozen moments.

A gap is the time between two firings beyond the timer's interval; a user
feels a gap of over ~100 ms as a stalled window. The first few firings include
the start-up of whatever is measured and are left out of the figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROBE_MS = 10
#: Firings left out at the start (the start-up of what is measured).
SKIP = 3


class GapProbe:
    """``start()``, let the event loop run, ``stop()``, then ``figures()``."""

    def __init__(self, interval_ms: int = PROBE_MS) -> None:
        from qtpy.QtCore import QElapsedTimer, QTimer

        self.interval_ms = interval_ms
        self.gaps: list[float] = []
        self._clock = QElapsedTimer()
        self._last = 0.0
        self._timer = QTimer()
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = self._clock.nsecsElapsed() / 1e6
        self.gaps.append(now - self._last - self.interval_ms)
        self._last = now

    def start(self) -> None:
        self._clock.start()
        self._last = 0.0
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def figures(self) -> dict[str, Any]:
        """Longest and 99th-percentile gap in ms (None before enough firings)."""
        gaps = self.gaps[SKIP:]
        if not gaps:
            return {"longest_gap_ms": None, "p99_gap_ms": None}
        return {
            "longest_gap_ms": round(float(max(gaps)), 1),
            "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
        }
