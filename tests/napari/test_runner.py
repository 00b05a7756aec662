"""Thread and child-process runners relay a job's events to the GUI thread."""

from __future__ import annotations

import pytest

import runner_jobs
from napari_fewlabel.napari._runner import JobFailed, ProcessRunner, ThreadRunner
from napari_fewlabel.train.events import Done, Progress

RUNNERS = [ThreadRunner, ProcessRunner]


def _collect(runner):
    seen: list = []
    runner.job_event.connect(seen.append)
    runner.job_failed.connect(seen.append)
    return seen


@pytest.mark.parametrize("runner_cls", RUNNERS)
def test_events_arrive_in_order_then_finished(qtbot, runner_cls):
    runner = runner_cls()
    seen = _collect(runner)
    with qtbot.waitSignal(runner.job_finished, timeout=60_000):
        runner.start(runner_jobs.count, 5, 0.01)
    assert [e.step for e in seen if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
    assert isinstance(seen[-1], Done) and not seen[-1].cancelled
    assert not runner.is_running


@pytest.mark.parametrize("runner_cls", RUNNERS)
def test_stop_ends_the_job_between_steps(qtbot, runner_cls):
    runner = runner_cls()
    seen = _collect(runner)
    runner.start(runner_jobs.count, 10_000, 0.02)
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in seen), timeout=60_000)
    with qtbot.waitSignal(runner.job_finished, timeout=10_000):
        runner.stop()
    done = seen[-1]
    assert isinstance(done, Done) and done.cancelled
    assert done.summary["last_step"] < 10_000


@pytest.mark.parametrize("runner_cls", RUNNERS)
def test_a_second_start_is_refused(qtbot, runner_cls):
    from napari_fewlabel.errors import FewLabelError

    runner = runner_cls()
    runner.start(runner_jobs.count, 10_000, 0.02)
    try:
        with pytest.raises(FewLabelError, match="already running"):
            runner.start(runner_jobs.count, 1, 0.0)
    finally:
        runner.shutdown()
    assert not runner.is_running


@pytest.mark.parametrize("runner_cls", RUNNERS)
def test_user_errors_come_back_as_failed(qtbot, runner_cls):
    runner = runner_cls()
    seen = _collect(runner)
    with qtbot.waitSignal(runner.job_finished, timeout=60_000):
        runner.start(runner_jobs.bad_input)
    failure = seen[-1]
    assert isinstance(failure, JobFailed) and failure.user_error
    assert "paint at least one slice" in failure.message


def test_a_crashed_child_is_reported(qtbot):
    runner = ProcessRunner()
    seen = _collect(runner)
    with qtbot.waitSignal(runner.job_finished, timeout=60_000):
        runner.start(runner_jobs.crash)
    failure = seen[-1]
    assert isinstance(failure, JobFailed)
    assert "stopped unexpectedly (exit code 3)" in failure.message


def test_shutdown_receives_a_large_last_event(qtbot):
    # The prediction sent after Stop is bigger than the pipe's buffer: the child can
    # only exit once the parent has read it, so shutdown must keep reading meanwhile.
    runner = ProcessRunner()
    seen = _collect(runner)
    runner.start(runner_jobs.large_result_on_stop, 4 * 2**20)
    qtbot.waitUntil(lambda: any(isinstance(e, Progress) for e in seen), timeout=60_000)
    process = runner._process
    runner.shutdown(timeout_s=30.0)
    assert not runner.is_running
    assert [len(e) for e in seen if isinstance(e, bytes)] == [4 * 2**20]
    assert isinstance(seen[-1], Done) and seen[-1].cancelled
    assert process.exitcode == 0


def test_shutdown_ends_a_job_that_ignores_stop(qtbot):
    # Terminated in the middle of sending an event: the GUI thread must not be left
    # waiting for the rest of it.
    runner = ProcessRunner()
    seen = _collect(runner)
    runner.start(runner_jobs.streams_large_events_and_ignores_stop, 2**20)
    qtbot.waitUntil(lambda: any(isinstance(e, bytes) for e in seen), timeout=60_000)
    process = runner._process
    runner.shutdown(timeout_s=0.5)
    assert not runner.is_running
    assert not process.is_alive()
    assert all(len(e) == 2**20 for e in seen if isinstance(e, bytes))
    # The user asked for the end: it is not reported as a crash ("killed by signal 15").
    assert not any(isinstance(e, JobFailed) for e in seen)
