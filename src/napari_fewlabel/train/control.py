"""What the GUI tells a running job: stop, and which slice is on screen.

A :class:`JobControl` is the ``cancel`` flag the runners (``napari._runner``)
pass to a job. Besides ``is_set()`` (the :class:`~.events.CancelFlag` every job
checks between steps) it carries the slice the user is looking at, which a
fine-tuning run uses for its live preview (:mod:`~.preview`). For a job in a
child process both live in shared memory made by the process's
``multiprocessing`` context (handed over when the child is spawned); for a job
in a thread they are plain thread-safe objects.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class SliceOnScreen(Protocol):
    """Anything with ``slice_on_screen()``: a :class:`JobControl`."""

    def slice_on_screen(self) -> tuple[int, int] | None: ...


class JobControl:
    """Stop flag and slice-on-screen for one job.

    Parameters
    ----------
    context : multiprocessing context, optional
        The context of the child process the job runs in (``spawn``); None for
        a job in a thread of this process.
    """

    def __init__(self, context: Any = None) -> None:
        if context is None:
            self._stop: Any = threading.Event()
            self._where: Any = [-1, -1]
            self._lock: Any = threading.Lock()
        else:
            self._stop = context.Event()
            self._where = context.Array("q", [-1, -1])
            self._lock = self._where.get_lock()

    # -- the stop flag (CancelFlag)
    def is_set(self) -> bool:
        return bool(self._stop.is_set())

    def set(self) -> None:
        self._stop.set()

    # -- the slice on screen
    def show_slice(self, axis: int | None, index: int = -1) -> None:
        """The viewer shows slice ``index`` along data ``axis``; None: no slice (3D view)."""
        with self._lock:
            if axis is None or index < 0:
                self._where[0], self._where[1] = -1, -1
            else:
                self._where[0], self._where[1] = int(axis), int(index)

    def slice_on_screen(self) -> tuple[int, int] | None:
        with self._lock:
            axis, index = int(self._where[0]), int(self._where[1])
        return None if axis < 0 else (axis, index)
