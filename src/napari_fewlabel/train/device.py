"""Device choice, its human description, mixed precision and memory figures.

``"auto"`` picks CUDA, then Apple's MPS, then the CPU. Mixed precision:
bfloat16 autocast on CUDA GPUs that have it (else float16 with a gradient
scaler), and on CPUs that compute bfloat16 natively (Intel AMX or AVX-512
BF16, :func:`cpu_has_bf16`), where a training step of the default network
runs about 2x faster (docs/benchmarks.md, issue 25). Other CPUs would emulate
bfloat16, slower than float32, and MPS has rough edges: they run float32.
``FEWLABEL_CPU_BF16=0`` (or ``1``) overrides the CPU's choice.

On the CPU, networks are kept in channels-last memory layout
(:func:`place_network`): oneDNN's convolutions, their backward above all,
run 1.3-1.8x faster on it than on the default layout.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from napari_fewlabel.errors import FewLabelError

try:
    import resource
except ImportError:  # Windows has no resource module; memory figures are then None
    resource = None  # type: ignore[assignment]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` into a usable device.

    Raises
    ------
    FewLabelError
        When the requested accelerator is not available.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise FewLabelError(f"Unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps.") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FewLabelError(
                "CUDA was requested but this PyTorch sees no CUDA GPU: use --device cpu, "
                "or install a CUDA build of PyTorch that matches your driver."
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise FewLabelError(
                f"GPU {index} does not exist ({torch.cuda.device_count()} found): "
                f"use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise FewLabelError("MPS was requested but is not available here: use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise FewLabelError(
            f"Device type {device.type!r} is not supported: use auto, cpu, cuda or mps."
        )
    return device


def available_devices() -> list[str]:
    """The choices a user has here: ``auto``, ``cpu``, each CUDA GPU, ``mps``."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    """A human string: ``"cpu (2 threads)"``, ``"cuda:0 (NVIDIA H100, 80 GB)"``, ``"mps"``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda:{device.index} ({props.name}, {props.total_memory / 2**30:.0f} GB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


@dataclass(frozen=True)
class Precision:
    """Mixed-precision setting for a device.

    Attributes
    ----------
    dtype : torch.dtype or None
        Autocast dtype, or None for float32 throughout.
    needs_grad_scaler : bool
        True for float16 (gradients underflow without scaling).
    """

    dtype: torch.dtype | None
    needs_grad_scaler: bool

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).replace("torch.", "")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """Whether CPU autocast runs in bfloat16: the CPU computes it natively (AMX or AVX-512 BF16).

    ``FEWLABEL_CPU_BF16=1`` or ``0`` overrides what the CPU reports.
    """
    forced = os.environ.get("FEWLABEL_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def precision_for(device: torch.device) -> Precision:
    """bfloat16 autocast on CUDA GPUs and CPUs that have it, float16 + scaler on older GPUs,
    else float32."""
    if device.type == "cpu":
        return Precision(torch.bfloat16 if cpu_has_bf16() else None, False)
    if device.type != "cuda":
        return Precision(None, False)
    if torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, False)
    return Precision(torch.float16, True)


_Network = TypeVar("_Network", bound=nn.Module)


def place_network(network: _Network, device: torch.device) -> _Network:
    """Move ``network`` to ``device``, in channels-last layout on the CPU; returns it."""
    if device.type == "cpu":
        # memory_format is a documented keyword of Module.to that its type stubs omit
        return network.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return network.to(device)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast to ``precision.dtype`` on ``device``, or nothing for float32."""
    if precision.dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=precision.dtype):
        yield


def memory_mb(device: torch.device) -> float | None:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps" or resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
