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
