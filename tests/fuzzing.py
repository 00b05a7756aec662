"""Fuzzing our readers: seed files, mutations, and a worker that survives what they do.

Used by ``tests/test_fuzz.py`` (a fixed, small budget through hypothesis) and
``benchmarks/fuzz.py`` (thousands of inputs per format). A reader passes an
input when it either reads it or raises :class:`FewLabelError`; anything else
is an *escape* (another exception type), a *crash* (the process died: a
segfault in a C++ library, an abort), a *hang* (no answer within the time
limit) or *memory* (the process hit its address-space cap).

Each input runs in a child forked from a worker process that has already
imported the readers and has never started a thread, so a fork costs
milliseconds and a crash, hang or runaway allocation takes down only that
child. The worker sets ``FEWLABEL_MAX_VOLUME_GB`` (the readers' documented
limit) to 1, and caps the child's address space at what it had when forked
plus ``MEMORY_HEADROOM``: a reader that tries to allocate past the limit it
was given is caught as *memory*.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("nifti", "nifti-gz", "nrrd", "mha", "dicom", "safetensors")
#: Per input: past this it is a hang (a reader's normal time here is well under a second).
TIME_LIMIT_S = 20.0
#: Address space a child may add to the worker's before an allocation fails.
MEMORY_HEADROOM = 3 * 2**30
#: The readers' own memory limit inside the worker (GB).
READER_LIMIT_GB = "1"
#: Peak resident memory of one read past which it counts as *memory* even if it ended
#: well: the reader's limit plus what the worker holds before reading (about 0.2 GB).
MEMORY_BOUND_MB = 1024 * float(READER_LIMIT_GB) + 512

INTERESTING_INTS = (0, 1, -1, 2, 3, 4, 7, 255, 256, 32767, -32768, 65535, 2**31 - 1, -(2**31))
INTERESTING_TOKENS = (
    "0", "-1", "1", "3", "99999", "-5", "2147483648", "1e308", "nan", "inf", "-inf", "",
    "abc", "LIST", "/dev/zero", "/etc/passwd", "../x.raw", "%d", "txt", "bzip2", "hex",
    "MET_UCHAR", "MET_DOUBLE", "double", "1290 1290 1290", "0 0 0", "1 1", "-1 -1 -1",
)  # fmt: skip


# ------------------------------------------------------------------ seed files
def write_seeds(folder: Path) -> dict[str, Path]:
    """One small valid file per format (DICOM: a series of 5 slices; its middle one)."""
    import nibabel as nib
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(10, 9, 8)).astype(np.int16)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    seeds = {}
    seeds["nifti"] = folder / "seed.nii"
    nib.save(nib.Nifti1Image(array, affine), seeds["nifti"])
    seeds["nifti-gz"] = folder / "seed.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), seeds["nifti-gz"])
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing((1.5, 1.0, 2.0))
    for kind, suffix in (("nrrd", ".nrrd"), ("mha", ".mha")):
        seeds[kind] = folder / f"seed{suffix}"
        sitk.WriteImage(image, str(seeds[kind]))
    seeds["dicom"] = _dicom_seed(folder / "dicom", array[:5].astype(np.float32))
    seeds["safetensors"] = _model_seed(folder / "model.safetensors")
    return seeds


def _dicom_seed(folder: Path, hu: np.ndarray) -> Path:
    """A 5-slice series; the slice in the middle is the one mutated (dropping it is a gap)."""
    import pydicom

    from dicom_writer import write_ct_series

    write_ct_series(
        folder, hu, first_position=np.zeros(3), pixel_spacing=(0.8, 0.8), slice_step_mm=2.0
    )
    files = sorted(folder.iterdir())
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return files[int(np.argsort(z)[len(z) // 2])]


def _model_seed(path: Path) -> Path:
    from napari_fewlabel.models.checkpoint import save_checkpoint
    from tiny_model import make_model

    model = make_model(num_classes=2, input_size=(16, 16))
    save_checkpoint(path, model.network, model.card)
    return path


# ------------------------------------------------------------------ mutations
def header_span(kind: str, data: bytes) -> int:
    """How many leading bytes hold the header, where mutations do the most."""
    if kind in ("nifti", "nifti-gz"):
        return 352
    if kind == "safetensors":
        return 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)
    if kind in ("nrrd", "mha"):
        end = data.find(b"\n\n") if kind == "nrrd" else data.find(b"ElementDataFile")
        return len(data) if end < 0 else end + 40
    return min(len(data), 2048)  # DICOM: meta and the first elements


def header_start(kind: str) -> int:
    """Where the header starts to matter (DICOM's 128-byte preamble is ignored by readers)."""
    return 128 if kind == "dicom" else 0


def mutate(kind: str, data: bytes, rand: random.Random) -> bytes:
    """1 to 6 random mutations of ``data``, most of them inside the header."""
    # Mostly mutate what is inside the gzip (the compressed bytes mostly give zlib errors).
    if kind == "nifti-gz" and rand.random() < 0.8:
        return gzip.compress(mutate("nifti", gzip.decompress(data), rand), mtime=0)
    buf = bytearray(data)
    span = max(1, header_span(kind, data))
    start = min(header_start(kind), len(buf) - 1)
    for _ in range(rand.randint(1, 6)):
        op = rand.random()
        if rand.random() < 0.2:
            span = len(buf)  # now and then anywhere: the voxels and weights too
        if kind in ("nrrd", "mha") and op < 0.45:
            buf = bytearray(_mutate_text_field(bytes(buf), span, rand))
            span = max(1, header_span(kind, bytes(buf)))
        elif op < 0.65 and len(buf) >= 8:
            width = rand.choice((1, 2, 4, 8))
            at = rand.randrange(start, max(start + 1, min(span, len(buf) - width)))
            value = rand.choice(INTERESTING_INTS) if rand.random() < 0.7 else rand.getrandbits(31)
            buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op < 0.8 and buf:
            at = rand.randrange(start, max(start + 1, min(span, len(buf))))
            buf[at % len(buf)] = rand.randrange(256)
        elif op < 0.9 and len(buf) > 1:
            del buf[rand.randrange(1, len(buf)) :]  # truncate
        elif op < 0.95 and kind in ("nifti", "nifti-gz") and len(buf) >= 348:
            # A float field (pixdim, scl_slope, vox_offset...) set to something odd.
            at = rand.randrange(68, 348 - 4, 4)
            buf[at : at + 4] = struct.pack("<f", rand.choice((0.0, -1.0, 1e30, float("nan"))))
        else:
            at = rand.randrange(0, max(1, len(buf)))
            chunk = bytes(buf[at : at + rand.randint(1, 64)])
            buf[at:at] = chunk  # duplicate a run of bytes
    return bytes(buf)


def _mutate_text_field(data: bytes, span: int, rand: random.Random) -> bytes:
    """Replace the value of one ``key: value`` / ``Key = value`` line of a text header."""
    head, tail = data[:span], data[span:]
    lines = head.split(b"\n")
    fields = [i for i, line in enumerate(lines) if b":" in line or b"=" in line]
    if not fields:
        return data
    i = rand.choice(fields)
    sep = b"=" if b"=" in lines[i] else b":"
    key = lines[i].split(sep, 1)[0]
    token = rand.choice(INTERESTING_TOKENS).encode()
    lines[i] = key + sep + b" " + token
    return b"\n".join(lines) + tail


# ------------------------------------------------------------------ the worker
@dataclass(frozen=True)
class Outcome:
    """What reading one input did."""

    kind: str  # "read", "refused", "escape", "crash", "hang", "memory"
    detail: str
    seconds: float
    max_rss_mb: float

    @property
    def passed(self) -> bool:
        return self.kind in ("read", "refused")


def _read(kind: str, path: str) -> None:
    if kind == "safetensors":
        from napari_fewlabel.models.checkpoint import load_checkpoint

        load_checkpoint(path)
    else:
        from napari_fewlabel.io import load_volume

        load_volume(Path(path).parent if kind == "dicom" else path)


def _child(kind: str, path: str, write_fd: int, memory_cap: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))
    from napari_fewlabel.errors import FewLabelError

    try:
        _read(kind, path)
        result = {"kind": "read", "detail": ""}
    except FewLabelError as exc:
        result = {"kind": "refused", "detail": str(exc)[:300]}
    except MemoryError as exc:
        result = {"kind": "memory", "detail": f"MemoryError {exc}"[:300]}
    except BaseException as exc:
        result = {"kind": "escape", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    os.write(write_fd, json.dumps(result).encode())
    os._exit(0)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(kind: str, path: str) -> dict[str, object]:
    import time

    read_fd, write_fd = os.pipe()
    cap = _vm_bytes() + MEMORY_HEADROOM
    began = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(kind, path, write_fd, cap)
    os.close(write_fd)
    chunks, status, usage = [], None, None
    deadline = began + TIME_LIMIT_S
    while True:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.perf_counter()))
        if ready:
            chunk = os.read(read_fd, 65536)
            if chunk:
                chunks.append(chunk)
                continue
            break  # end of file: the child has exited or closed the pipe
        os.kill(pid, signal.SIGKILL)  # out of time
        break
    os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - began
    rss = usage.ru_maxrss / 1024
    if chunks:
        result = json.loads(b"".join(chunks))
    elif seconds >= TIME_LIMIT_S:
        result = {"kind": "hang", "detail": f"no answer in {TIME_LIMIT_S:.0f} s"}
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        result = {"kind": "memory", "detail": "killed (out of memory?)"}
    else:
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        result = {"kind": "crash", "detail": f"exit {code}"}
    if result["kind"] in ("read", "refused") and rss > MEMORY_BOUND_MB:
        result = {"kind": "memory", "detail": f"peak {rss:.0f} MB, {result['kind']}: "
                  f"{result['detail']}"}  # fmt: skip
    return {**result, "seconds": round(seconds, 3), "max_rss_mb": round(rss, 1)}


def worker_main() -> None:
    """Read ``kind<TAB>path`` lines on stdin, answer one JSON line each."""
    os.environ["FEWLABEL_MAX_VOLUME_GB"] = READER_LIMIT_GB
    import napari_fewlabel.io
    import napari_fewlabel.models.checkpoint  # noqa: F401

    for line in sys.stdin:
        kind, path = line.rstrip("\n").split("\t", 1)
        print(json.dumps(_run_one(kind, path)), flush=True)


class Worker:
    """The forking worker, as a subprocess of the caller."""

    def __init__(self) -> None:
        tests = str(Path(__file__).resolve().parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
        }
        env["OMP_NUM_THREADS"] = "1"  # no thread pool in the worker: forks stay safe
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import fuzzing; fuzzing.worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self, kind: str, path: Path) -> Outcome:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(f"{kind}\t{path}\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the fuzzing worker died (see its stderr above)")
        d = json.loads(line)
        return Outcome(d["kind"], d["detail"], d["seconds"], d["max_rss_mb"])

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=30)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def place(kind: str, seed: Path, data: bytes, folder: Path) -> Path:
    """Write a mutated input where its reader will look for it (a DICOM slice among its series)."""
    if kind == "dicom":
        import shutil

        series = folder / "dicom"
        if series.exists():
            shutil.rmtree(series)
        shutil.copytree(seed.parent, series)
        target = series / seed.name
    else:
        target = folder / f"input{''.join(seed.suffixes)}"
    target.write_bytes(data)
    return target


def fuzz(
    worker: Worker,
    kind: str,
    seed: Path,
    folder: Path,
    rand: random.Random,
    n: int,
    on_outcome: Callable[[Outcome, bytes], None],
) -> None:
    """``n`` mutated inputs of one format through the worker; each outcome to ``on_outcome``."""
    original = seed.read_bytes()
    for _ in range(n):
        data = mutate(kind, original, rand)
        on_outcome(worker.read(kind, place(kind, seed, data, folder)), data)
