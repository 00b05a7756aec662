"""Small real jobs for the runner tests (importable by a spawned child process)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.train.events import Done, Progress


def count(steps: int, step_s: float, *, cancel) -> Iterator[Progress | Done]:
    for step in range(1, steps + 1):
        if cancel.is_set():
            yield Done(checkpoint=None, summary={"last_step": step - 1}, cancelled=True)
            return
        time.sleep(step_s)
        yield Progress(step=step, total=steps, losses={"loss": 1.0 / step})
    yield Done(checkpoint=None, summary={"last_step": steps})


def bad_input(*, cancel) -> Iterator[Progress]:
    yield Progress(step=1, total=2, losses={})
    raise FewLabelError("No labelled slice found: paint at least one slice.")


def crash(*, cancel) -> Iterator[Progress]:
    yield Progress(step=1, total=2, losses={})
    os._exit(3)


def large_result_on_stop(size: int, *, cancel) -> Iterator[object]:
    """Like the fine-tuning job: on Stop it still sends a prediction, larger than a pipe."""
    step = 0
    while not cancel.is_set():
        step += 1
        time.sleep(0.01)
        yield Progress(step=step, total=10**6, losses={})
    yield bytes(size)
    yield Done(checkpoint=None, summary={"last_step": step}, cancelled=True)


def streams_large_events_and_ignores_stop(size: int, *, cancel) -> Iterator[bytes]:
    """A job that never checks its flag and keeps the pipe full: only terminate ends it."""
    while True:
        yield bytes(size)
