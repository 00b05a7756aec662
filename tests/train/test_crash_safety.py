"""Crash safety (issue 24): a fine-tuning child killed at any moment never leaves a bad model.

A real fine-tuning job (tiny network, 16x64x64 phantom, a checkpoint after every
step) runs in a child process, as the GUI's ProcessRunner and ``fewlabel finetune``
run it, and is killed at seeded-random moments of its life: during start-up, during
training, and in the middle of a checkpoint write. After each kill the output
model is either absent or a complete checkpoint that loads with the expected
classes, and the folder holds nothing but the model and at most the one temporary
file of the killed write; once that file is older than the staleness age (set with
``os.utime``, no sleeping) the next write or job start into the folder removes it.
A resumed run into the same ``--out`` then finishes with a loadable model.

Kills in the middle of a write are made certain two ways:

* by the kernel, with nothing patched: the child runs with ``RLIMIT_FSIZE`` below a
  checkpoint's size and ``SIGXFSZ`` at its default action, so the process dies in the
  ``write`` system call that crosses the limit, that many bytes into the temporary
  file (only a first write can be hit this way, all checkpoints being the same size);
* by the child itself, for the n-th write: the child's ``os.fsync`` prints
  ``WRITING <temp file> <size>`` and pauses when it is called on the n-th temporary
  checkpoint (written, not yet renamed), and the parent sends SIGKILL on that line.
  Only the killed child is patched, and only to wait; everything the parent checks is
  the unpatched code.

A third kind watches the folder without any help from the child and kills when a
temporary checkpoint appears; whether that lands before or after the rename is up to
the scheduler, and the checks hold either way.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from napari_fewlabel.io.atomic import STALE_AFTER_S, TEMP_MARK, is_our_temp_file
from napari_fewlabel.models.checkpoint import (
    check_output_path,
    load_checkpoint,
    load_optimizer_state,
    write_safetensors,
)

pytestmark = pytest.mark.slow

SEED = 24
OUT_NAME = "model.safetensors"
#: Steps of a run that is always killed long before it ends.
LONG = 1000
#: Temporary files of writes to the model (not the folder check's probe file).
MODEL_TEMP_PREFIX = f".{OUT_NAME}{TEMP_MARK}"

# argv: out, steps, resume (0/1), write to interrupt (0: none), file size limit (0: none).
_CHILD = r"""
import sys
print("STARTED", flush=True)
import os, resource, signal, time
from pathlib import Path

import numpy as np

from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.models import checkpoint
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train.events import Done, Progress
from napari_fewlabel.train.finetune import FinetuneJob, FinetuneSettings, run

out, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
stall_at, fsize = int(sys.argv[4]), int(sys.argv[5])

writes = 0
real_fsync = os.fsync


def fsync_pausing_at_one_write(fd):
    # Called once per checkpoint write: the temporary file is complete, not yet renamed.
    global writes
    name = os.readlink(f"/proc/self/fd/{fd}")
    if ".fewlabel-tmp-" in name:
        writes += 1
        if writes == stall_at:
            print("WRITING", name, os.fstat(fd).st_size, flush=True)
            time.sleep(60)  # killed here
    real_fsync(fd)


os.fsync = fsync_pausing_at_one_write

ph = cardiac_phantom("MR", seed=0, shape=(16, 64, 64), spacing_mm=(4.0, 3.0, 3.0))
painted = np.zeros_like(ph.labels.array)
painted[[6, 11]] = ph.labels.array[[6, 11]]
job = FinetuneJob(
    image=ph.image,
    labels=ph.labels.with_array(painted),
    out=out,
    classes=ph.classes,
    resume_from=out if resume else None,
    steps=steps,
    device="cpu",
    settings=FinetuneSettings(batch_labelled=2, batch_unlabelled=2, validate_every=2),
    architecture=UNetConfig(in_slices=3, widths=(8, 16, 32), full_res_width=4),
    checkpoint_every_s=0.0,  # a checkpoint after every step
)
if fsize:
    # The kernel kills us in the write that crosses the limit (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
for event in run(job):
    if isinstance(event, Progress):
        print("STEP", event.step, flush=True)
    elif isinstance(event, Done):
        print("DONE", event.checkpoint, flush=True)
"""


class Child:
    """A fine-tuning child process whose stdout lines are read by a thread."""

    def __init__(
        self, out: Path, *, steps: int, resume: bool = False, stall_at: int = 0, fsize: int = 0
    ) -> None:
        # stderr is a pipe too: the file size limit of a regular file would catch it.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(out), str(steps), str(int(resume)),
             str(stall_at), str(fsize)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line.strip())
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            self._stderr.append(self.proc.stderr.read())

    def _reap(self) -> int:
        code = self.proc.wait()
        for reader in self._readers:
            reader.join()
        return code

    def stderr(self) -> str:
        return "".join(self._stderr)[-3000:]

    def wait_for(self, wanted: str) -> str:
        """The first line starting with ``wanted``; fails when the child ends before it."""
        while True:
            line = self.lines.get()
            if line is None:
                code = self._reap()
                pytest.fail(
                    f"the child ended (exit {code}) before printing {wanted!r}; "
                    f"it printed {self.seen}; stderr:\n{self.stderr()}"
                )
            self.seen.append(line)
            if line.startswith(wanted):
                return line

    def kill(self) -> int:
        """SIGKILL the child (if it still runs) and reap it; its exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self._reap()

    def finish(self) -> int:
        """Wait for the child to end by itself; its exit status (its lines in ``seen``)."""
        code = self._reap()
        while (line := self.lines.get()) is not None:
            self.seen.append(line)
        return code


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_our_temp_file(p))


def _age(paths: list[Path]) -> None:
    old = time.time() - STALE_AFTER_S - 5
    for path in paths:
        os.utime(path, (old, old))


def _check_after_kill(folder: Path, out: Path, classes) -> tuple[int | None, list[Path]]:
    """The invariants after any kill; the model's steps (None: no model) and the temp files."""
    temps = _temp_files(folder)
    others = sorted(p.name for p in folder.iterdir() if p != out and p not in temps)
    assert others == [], f"files other than the model and temporary files: {others}"
    assert len(temps) <= 1, f"more than the killed write's temporary file: {temps}"
    if not out.exists():
        return None, temps
    model = load_checkpoint(out)  # complete: the header, the card and every tensor read
    assert model.card.classes == tuple(classes)
    done = int(model.card.training["steps_done"])
    assert 1 <= done <= LONG
    optimizer = load_optimizer_state(out)  # what --resume needs
    assert optimizer is not None
    assert {float(s["step"]) for s in optimizer["state"].values()} == {float(done)}
    return done, temps


def _remove_stale(folder: Path, out: Path, temps: list[Path], by_job_start: bool) -> None:
    """Age the killed write's leftovers; the next job start or write must remove them."""
    _age(temps)
    if by_job_start:
        check_output_path(out)  # what every job start calls first
    else:
        write_safetensors(folder / "next.safetensors", {"x": torch.zeros(2)}, {"k": "v"})
        (folder / "next.safetensors").unlink()
    assert _temp_files(folder) == []


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start children; any still running when the test ends (it failed) is killed."""
    children: list[Child] = []

    def start(out: Path, **kwargs: Any) -> Child:
        children.append(Child(out, **kwargs))
        return children[-1]

    yield start
    for child in children:
        child.kill()


def test_a_finetuning_child_killed_at_random_moments_leaves_no_half_model(
    tmp_path, tiny_case, spawn
):
    rng = random.Random(SEED)
    folder = tmp_path / "models"
    folder.mkdir()
    out = folder / OUT_NAME
    classes = tiny_case.classes

    # 1. During start-up: imports, the phantom, the data checks, building the network.
    child = spawn(out, steps=LONG)  # still running whenever the kill comes
    child.wait_for("STARTED")
    time.sleep(rng.uniform(0.0, 2.5))
    assert child.kill() == -signal.SIGKILL
    done, temps = _check_after_kill(folder, out, classes)
    _remove_stale(folder, out, temps, by_job_start=True)

    # 2. During training, a checkpoint written after every step: a random step, then a
    # random fraction of a step (the kill may land in a write).
    child = spawn(out, steps=LONG)
    after = rng.randint(2, 5)
    child.wait_for(f"STEP {after}")  # printed after the checkpoint of step `after` - 1
    time.sleep(rng.uniform(0.0, 0.1))
    assert child.kill() == -signal.SIGKILL
    done, temps = _check_after_kill(folder, out, classes)
    assert done is not None and done >= after - 1
    _remove_stale(folder, out, temps, by_job_start=False)

    # 3. In the first write, by the kernel, nothing patched: the file size limit is crossed
    # a random number of bytes into the checkpoint; the model of run 2 must stay as it was.
    before = out.read_bytes()
    limit = rng.randint(1, len(before) - 1)
    child = spawn(out, steps=6, fsize=limit)
    code = child.finish()
    assert code == -signal.SIGXFSZ, f"exit {code}, printed {child.seen}; stderr:\n{child.stderr()}"
    assert child.seen == ["STARTED", "STEP 1"]  # died in the first write, after step 1
    done, temps = _check_after_kill(folder, out, classes)
    assert out.read_bytes() == before
    assert len(temps) == 1 and temps[0].name.startswith(MODEL_TEMP_PREFIX)
    assert temps[0].stat().st_size == limit  # killed mid-write, exactly at the limit
    _remove_stale(folder, out, temps, by_job_start=True)

    # 4. Watching the folder only: SIGKILL as soon as a temporary checkpoint shows up.
    child = spawn(out, steps=200)
    child.wait_for(f"STEP {rng.randint(1, 4)}")
    while child.proc.poll() is None:
        if any(p.name.startswith(MODEL_TEMP_PREFIX) for p in folder.iterdir()):
            break
    code = child.kill()
    # Killed, unless it finished all 200 steps first (then it must have said so).
    assert code == -signal.SIGKILL or (
        code == 0 and child.finish() == 0 and "DONE" in str(child.seen)
    )
    done, temps = _check_after_kill(folder, out, classes)
    assert done is not None
    _remove_stale(folder, out, temps, by_job_start=False)

    # 5. In the n-th write, its temporary file written but not renamed (the child pauses
    # there and says so): the model under the final name is the checkpoint before.
    stall_at = rng.randint(2, 5)
    child = spawn(out, steps=20, stall_at=stall_at)
    _, temp_name, size = child.wait_for("WRITING").split()
    assert child.kill() == -signal.SIGKILL
    done, temps = _check_after_kill(folder, out, classes)
    assert done == stall_at - 1
    assert temps == [Path(temp_name)] and temps[0].stat().st_size == int(size)

    # A later run into the same --out resuming the killed one finishes with a loadable
    # model; its job start removes the killed write's (now stale) temporary file.
    _age(temps)
    child = spawn(out, steps=8, resume=True)
    code = child.finish()
    assert code == 0, f"exit {code}; stderr:\n{child.stderr()}"
    assert child.seen[-1] == f"DONE {out}"
    assert [line for line in child.seen if line.startswith("STEP")] == [
        f"STEP {s}" for s in range(stall_at, 9)
    ]  # continued from the last complete checkpoint
    assert sorted(folder.iterdir()) == [out]  # no temporary file, stale or new
    model = load_checkpoint(out)
    assert model.card.classes == tuple(classes)
    assert model.card.training["steps_done"] == 8
