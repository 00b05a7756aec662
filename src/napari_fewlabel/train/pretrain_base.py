"""What every pretraining method shares: torchrun ranks, schedule, momentum update, hardware.

:mod:`napari_fewlabel.train.pretrain` (2D IDEAL / med-moco) and
:mod:`napari_fewlabel.train.pretrain_drasclr` (3D DrasCLR) run the same way
under ``torchrun``: every process joins the process group that torchrun's
environment variables describe (NCCL on CUDA, gloo on CPU), CUDA ranks use
``cuda:LOCAL_RANK``, only rank 0 yields events and writes checkpoints, and
all ranks stop together when any of them is told to.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from napari_fewlabel import __version__
from napari_fewlabel.io.volume import Modality
from napari_fewlabel.train.device import memory_mb, resolve_device
from napari_fewlabel.train.events import CancelFlag, Done, Event, Progress


@dataclass(frozen=True)
class Ranks:
    """Where this process stands under torchrun (``0, 1, 0, False`` when run alone).

    Attributes
    ----------
    rank, world_size, local_rank : int
    started_group : bool
        This job initialised the process group (and must destroy it).
    """

    rank: int
    world_size: int
    local_rank: int
    started_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Ranks:
    """Join the torchrun process group when its environment variables are set."""
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE")):
        return Ranks(0, 1, 0, False)
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    started = False
    if world_size > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return Ranks(rank, world_size, local_rank, started)


def finish_distributed(ranks: Ranks) -> None:
    """Leave the process group if this job started it."""
    if ranks.started_group and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device_name: str, ranks: Ranks) -> torch.device:
    """The device a job asked for; under torchrun, CUDA ranks get ``cuda:LOCAL_RANK``."""
    device = resolve_device(device_name)
    if device.type == "cuda" and ranks.world_size > 1:
        device = torch.device("cuda", ranks.local_rank)
    return device


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (so all ranks stop together)."""
    if ranks.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def lr_factor(step: int, progress: float) -> float:
    """Linear warm-up over the first 10 steps, then cosine decay to 0 as ``progress`` goes to 1."""
    warm = min(1.0, (step + 1) / 10)
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def hardware_text() -> str:
    """CPU model and core count, for model cards."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPU cores visible"


def card_modality(modalities: Mapping[str, Modality]) -> Modality:
    """The one modality of an archive, or ``"unknown"`` when it mixes them."""
    kinds = set(modalities.values())
    return kinds.pop() if len(kinds) == 1 else "unknown"


@torch.no_grad()
def momentum_update(query: nn.Module, key: nn.Module, m: float) -> None:
    """MoCo's :math:`\\theta_k \\leftarrow m \\theta_k + (1 - m) \\theta_q`."""
    for q, k in zip(query.parameters(), key.parameters(), strict=True):
        k.mul_(m).add_(q.detach(), alpha=1 - m)


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a resumed optimizer's moments to ``device`` (its step counters stay on the CPU)."""
    for entries in optimizer.state.values():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and name != "step":
                entries[name] = value.to(device)


def backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Zero the gradients, back-propagate ``loss`` (scaled for float16) and step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def run_record(
    *,
    steps_done: int,
    steps_planned: int,
    global_batch: int,
    ranks: Ranks,
    seed: int,
    device_text: str,
    precision_name: str,
    train_seconds: float,
    half: bool,
) -> dict[str, Any]:
    """How a pretraining run went, for its model card: steps, batch, processes, hardware, date."""
    return {
        "steps_done": steps_done,
        "steps_planned": steps_planned,
        "global_batch": global_batch,
        "processes": ranks.world_size,
        # torchrun's process-group backend (nccl on GPUs, gloo on CPUs); None for one process.
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "seed": seed,
        "device": device_text,
        "precision": precision_name,
        "hardware": hardware_text(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "train_seconds": round(train_seconds, 1),
        "storage_dtype": "float16" if half else "float32",
    }


@dataclass
class TrainingLoop:
    """The step loop every pretraining method shares, on every rank.

    Each step: check Stop and the time budget on all ranks together, run
    ``one_step(step)`` (returns the losses), let ``after_step(step, seconds
    per step)`` update ``figures``; on rank 0 a :class:`Progress` event and a
    checkpoint every ``checkpoint_every`` steps. At the end rank 0 saves, all
    ranks meet, and rank 0 yields :class:`Done` with the summary.
    """

    steps: int
    step0: int
    one_step: Callable[[int], dict[str, float]]
    after_step: Callable[[int, float], None]
    figures: dict[str, float]
    save: Callable[[int], Path]
    checkpoint_every: int
    ranks: Ranks
    device: torch.device
    device_text: str
    state_file: Path
    queue_keys_seen: Callable[[], int]
    start: float
    train_seconds0: float
    time_budget_s: float | None

    def run(self, cancel: CancelFlag | None) -> Iterator[Event]:
        step, last_save_step, cancelled = self.step0, self.step0, False
        checkpoint: Path | None = None
        step_times: list[float] = []
        losses: dict[str, float] = {}
        while step < self.steps:
            stop = cancel is not None and cancel.is_set()
            if self.time_budget_s is not None:
                stop = stop or time.perf_counter() - self.start >= self.time_budget_s
            if any_rank(stop, self.ranks, self.device):
                cancelled = cancel is not None and cancel.is_set()
                break
            t0 = time.perf_counter()
            losses = self.one_step(step)
            step += 1
            step_times.append(time.perf_counter() - t0)
            per_step = float(np.mean(step_times[-20:]))
            self.after_step(step, per_step)
            if self.ranks.is_main:
                yield Progress(
                    step=step,
                    total=self.steps,
                    losses=losses,
                    eta_s=(self.steps - step) * per_step,
                    device=self.device_text,
                    memory_mb=memory_mb(self.device),
                    phase="pretrain",
                    extra={**self.figures, "queue_keys_seen": float(self.queue_keys_seen())},
                )
                if step - last_save_step >= self.checkpoint_every and step < self.steps:
                    checkpoint = self.save(step)
                    last_save_step = step
        if self.ranks.is_main:
            checkpoint = self.save(step)
        if self.ranks.world_size > 1:
            dist.barrier()
        if self.ranks.is_main:
            yield Done(
                checkpoint,
                {
                    "steps_done": step,
                    "steps_planned": self.steps,
                    "train_seconds": round(
                        self.train_seconds0 + time.perf_counter() - self.start, 1
                    ),
                    "final_losses": dict(losses),
                    "device": self.device_text,
                    "processes": self.ranks.world_size,
                    "state": str(self.state_file),
                    "queue_keys_seen": int(self.queue_keys_seen()),
                    **self.figures,
                    "package_version": __version__,
                },
                cancelled=cancelled,
            )
