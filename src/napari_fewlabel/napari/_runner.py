"""Run a job (a generator of events) off the GUI thread and relay its events.

Two runners with one interface, so the widget does not care which is used:

* :class:`ProcessRunner` (default) runs the job in a child process started with
  ``spawn``. Training never competes with the GUI for the GIL, a crash in the
  job (or the CUDA driver) cannot take napari down, and all GPU memory is
  returned when the job ends. The child sends events down a pipe; a reader
  thread here moves them into a local queue that a QTimer drains on the GUI
  thread, so the GUI thread never reads the pipe itself (a child killed in the
  middle of sending a large event would otherwise leave it blocked for good).
* :class:`ThreadRunner` runs it in a thread of this process: no start-up cost,
  but Python code between torch calls holds the GIL.

``docs/benchmarks.md`` ("GUI responsiveness") has the measurement behind the
default. A job is any importable function ``target(*args, cancel=flag)``
returning an iterator of picklable events; the runner passes a
:class:`~napari_fewlabel.train.control.JobControl`: a flag with ``is_set()``,
set on :meth:`stop`, that also carries the slice on screen
(:meth:`show_slice`) for a fine-tuning run's live preview.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.train.control import JobControl

#: How often the GUI thread drains the event queue (ms).
POLL_MS = 30


@dataclass(frozen=True)
class JobFailed:
    """The job raised: ``user_error`` is True for a FewLabelError (message says what to do)."""

    message: str
    user_error: bool


def notify_failure(failure: JobFailed, what: str) -> str:
    """Show a failed job as a napari error notification; returns its first line.

    A :class:`FewLabelError` is shown as it is (it says what to do); anything
    else as "``what`` failed unexpectedly" with the traceback printed for a
    bug report.
    """
    from napari.utils.notifications import show_error

    first_line = failure.message.splitlines()[0]
    if failure.user_error:
        show_error(failure.message)
    else:
        show_error(f"{what} failed unexpectedly: {first_line} (details in the terminal).")
        print(failure.message)  # the traceback, for a bug report
    return first_line


class _End:
    """Sentinel: the job's generator is exhausted."""


def _drive(target: Callable[..., Iterator[Any]], args: tuple, cancel: Any, put: Callable) -> None:
    try:
        for event in target(*args, cancel=cancel):
            put(event)
    except FewLabelError as exc:
        put(JobFailed(str(exc), user_error=True))
    except BaseException as exc:  # report anything, then let the worker end
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        put(JobFailed(f"{detail}\n\n{traceback.format_exc()}", user_error=False))
    finally:
        put(_End())


def _child_main(jobs: Any, events: Any, cancel: Any) -> None:
    # The job arrives through a queue rather than as Process arguments: spawn writes
    # its arguments into a pipe that the child only drains while unpickling them
    # (importing torch on the way), which would block the GUI thread for seconds.
    target, args = jobs.get()
    # Events go out synchronously (no feeder thread that must flush at exit): the
    # parent's reader thread is always draining the other end.
    with contextlib.suppress(BrokenPipeError, OSError):  # the parent has gone away
        _drive(target, args, cancel, events.send)
    events.close()


def _pump(connection: Any, out: queue.Queue[Any]) -> None:
    """Reader thread: move everything the child sends into ``out`` until it is gone."""
    try:
        while True:
            out.put(connection.recv())
    except (EOFError, OSError):  # the child closed its end, exited or was killed
        pass
    except BaseException as exc:  # an event that cannot be unpickled here
        out.put(JobFailed(f"The training process sent an unreadable event: {exc!r}", False))
    finally:
        with contextlib.suppress(OSError):
            connection.close()


def _crash_message(exit_code: int | None) -> str:
    text = "The training process stopped unexpectedly"
    if exit_code is not None and exit_code < 0:
        return (
            f"{text} (killed by signal {-exit_code}). It may have run out of memory: "
            "try fewer steps or a smaller batch, or close other programs."
        )
    if exit_code is not None:
        text += f" (exit code {exit_code})"
    return f"{text}. Start it again; if it keeps failing, run the same job with `fewlabel finetune` to see the error."


class _Runner(QObject):
    """Common part: a QTimer on the GUI thread drains events and emits them."""

    # (QObject.event is Qt's event handler: the signals must not shadow it.)
    #: any event the job yields (Progress, Notice, Done, or a job-specific result)
    job_event = Signal(object)
    #: the job raised; a :class:`JobFailed`
    job_failed = Signal(object)
    #: the job is over (after its last ``job_event`` or ``job_failed``)
    job_finished = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._drain)
        self._running = False
        # Set by shutdown: a child ended by force then was asked to end, not crashed.
        self._ending_on_request = False

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self, target: Callable[..., Iterator[Any]], *args: Any) -> None:
        if self._running:
            raise FewLabelError("A job is already running: stop it before starting another.")
        self._launch(target, args)
        self._ending_on_request = False
        self._running = True
        self._timer.start()

    def stop(self) -> None:
        """Ask the job to stop at its next check (between training steps)."""
        self._cancel_flag().set()

    def show_slice(self, axis: int | None, index: int = -1) -> None:
        """Tell the job which slice the viewer shows (None: no slice, e.g. the 3D view)."""
        self._cancel_flag().show_slice(axis, index)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop and wait; used when the viewer closes. Forces the end after ``timeout_s``."""
        if not self._running:
            return
        self._ending_on_request = True
        self.stop()
        self._join(timeout_s)
        self._drain()
        self._finish()

    # -- to implement
    def _launch(self, target: Callable[..., Iterator[Any]], args: tuple) -> None:
        raise NotImplementedError

    def _cancel_flag(self) -> JobControl:
        raise NotImplementedError

    def _get_nowait(self) -> Any:
        raise NotImplementedError

    def _alive(self) -> bool:
        raise NotImplementedError

    def _join(self, timeout_s: float) -> None:
        raise NotImplementedError

    def _exit_code(self) -> int | None:
        return None

    def _close(self) -> None:
        """Release the event channel once everything has been drained."""

    # -- common
    def _drain(self) -> None:
        while self._running:
            try:
                item = self._get_nowait()
            except queue.Empty:
                if not self._alive():
                    # Gone without its end marker: killed (out of memory?) or crashed.
                    try:  # the marker may have landed between the two checks
                        item = self._get_nowait()
                    except queue.Empty:
                        if not self._ending_on_request:  # a cancel is not a crash
                            self.job_failed.emit(JobFailed(_crash_message(self._exit_code()), True))
                        self._finish()
                        return
                else:
                    return
            if isinstance(item, _End):
                self._finish()
                return
            if isinstance(item, JobFailed):
                self.job_failed.emit(item)
            else:
                self.job_event.emit(item)

    def _finish(self) -> None:
        if not self._running:
            return
        self._running = False
        self._timer.stop()
        # No blocking join here: a child that has sent its end marker may still take a
        # second to tear torch down, and the GUI thread must not wait for that.
        self._join(0.0)
        self._close()
        self.job_finished.emit()


class ProcessRunner(_Runner):
    """Runs the job in a spawned child process (see module docstring)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ctx = mp.get_context("spawn")
        self._process: Any = None
        self._jobs: Any = None
        self._reader: threading.Thread | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancel = JobControl(self._ctx)

    def _launch(self, target: Callable[..., Iterator[Any]], args: tuple) -> None:
        self._events = queue.Queue()
        receive, send = self._ctx.Pipe(duplex=False)
        self._jobs = self._ctx.Queue()
        # If the child dies before reading the job, exiting napari must not wait for it.
        self._jobs.cancel_join_thread()
        self._cancel = JobControl(self._ctx)
        self._process = self._ctx.Process(
            target=_child_main,
            args=(self._jobs, send, self._cancel),
            name="fewlabel-job",
            daemon=True,
        )
        self._process.start()
        # The child holds its own copy now; with ours closed, the reader sees end-of-file
        # as soon as the child is gone, however it ends.
        send.close()
        self._reader = threading.Thread(
            target=_pump, args=(receive, self._events), name="fewlabel-events", daemon=True
        )
        self._reader.start()
        self._jobs.put((target, args))  # a feeder thread writes it; the GUI thread returns at once

    def _cancel_flag(self) -> JobControl:
        return self._cancel

    def _get_nowait(self) -> Any:
        return self._events.get_nowait()

    def _alive(self) -> bool:
        # The reader ends only after the child's end of the pipe has closed and every
        # event before that has been queued.
        return self._reader is not None and self._reader.is_alive()

    def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        self._process.join(0.5)  # the pipe has closed: the process is ending
        return self._process.exitcode

    def _join(self, timeout_s: float) -> None:
        if self._process is None or self._reader is None:
            return
        if timeout_s <= 0:
            self._reader.join(0.0)
            self._process.join(0.0)
            if self._process.exitcode is None:
                # Still tearing torch down: reap it when it exits, or it stays a zombie
                # until the next Start.
                threading.Thread(
                    target=self._process.join, name="fewlabel-reaper", daemon=True
                ).start()
            return
        # Wait on the reader first: it keeps draining the pipe so the child can finish
        # sending (a prediction can be larger than the pipe's buffer) and exit.
        deadline = time.monotonic() + timeout_s
        self._reader.join(timeout_s)
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2.0)
        self._reader.join(2.0)  # end-of-file follows the child's end

    def _close(self) -> None:
        if self._jobs is not None:
            with contextlib.suppress(OSError, ValueError):
                self._jobs.close()


class ThreadRunner(_Runner):
    """Runs the job in a background thread of this process."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread: threading.Thread | None = None
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancel = JobControl()

    def _launch(self, target: Callable[..., Iterator[Any]], args: tuple) -> None:
        self._events = queue.Queue()
        self._cancel = JobControl()
        self._thread = threading.Thread(
            target=_drive,
            args=(target, args, self._cancel, self._events.put),
            name="fewlabel-job",
            daemon=True,
        )
        self._thread.start()

    def _cancel_flag(self) -> JobControl:
        return self._cancel

    def _get_nowait(self) -> Any:
        return self._events.get_nowait()

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
