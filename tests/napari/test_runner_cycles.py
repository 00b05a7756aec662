"""Start/Stop again and again through the runners: nothing leaks.

A user may press Start and Stop many times in a session. Each cycle here runs a
real job (a spawned child for ProcessRunner), stops it between steps, and waits
for the end; afterwards no child process, thread or file descriptor may be left
over from the cycles. ``benchmarks/start_stop_cycles.py`` runs 100 cycles and
also follows the parent's memory.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest

import runner_jobs
from napari_fewlabel.napari._runner import ProcessRunner, ThreadRunner
from napari_fewlabel.train.events import Done, Progress

CYCLES = 8


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _one_cycle(qtbot, runner) -> None:
    seen: list = []
    runner.job_event.connect(seen.append)
    try:
        runner.start(runner_jobs.count, 10_000, 0.01)
        qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in seen), timeout=60_000)
        with qtbot.waitSignal(runner.job_finished, timeout=30_000):
            runner.stop()
    finally:
        runner.job_event.disconnect(seen.append)
    assert isinstance(seen[-1], Done) and seen[-1].cancelled


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("runner_cls", [ThreadRunner, ProcessRunner])
def test_start_stop_cycles_leave_no_process_thread_or_descriptor(qtbot, runner_cls):
    runner = runner_cls()
    _one_cycle(qtbot, runner)  # the first cycle creates what stays (Qt timers, a resource tracker)
    me = psutil.Process()
    threads_after_first = threading.active_count()
    fds_after_first = _fds()
    children_after_first = {c.pid for c in me.children(recursive=True)}
    for _ in range(CYCLES):
        _one_cycle(qtbot, runner)
    # A spawned child may take a moment to be reaped after its end marker.
    qtbot.waitUntil(
        lambda: {c.pid for c in me.children(recursive=True)} <= children_after_first,
        timeout=10_000,
    )
    qtbot.waitUntil(lambda: threading.active_count() <= threads_after_first, timeout=10_000)
    qtbot.waitUntil(lambda: _fds() <= fds_after_first, timeout=10_000)
    assert not runner.is_running
