"""Scans per minute of ``fewlabel predict SCAN... --out-dir DIR``: 1 process vs 2 under torchrun.

Writes ``--scans`` different crops of the lung1 chest CT (pyradiomics test data,
512x512x48; each crop ``--side`` x ``--side`` x 48, shifted by 16 voxels from
the previous one) as NRRD into a temporary folder, and a random model of the
default architecture (2.5 M parameters, 3 adjacent slices, 256x256 input,
4 classes; predicting along one plane unless ``--planes 3``, the engine's
default of three planes averaged) — inference speed does not depend on the
weights. Then runs, alternating, ``--repeats`` times each:

* ``fewlabel predict MODEL SCANS... --out-dir D`` in one process (torch's own
  thread count: every core), and
* ``torchrun --nproc_per_node=2 ... predict ...`` (``OMP_NUM_THREADS`` = cores / 2),

each into a fresh folder (a folder with the masks already there would be
skipped). Prints JSON: per setup the median command wall time (process start,
torch import and model load included) and the time ``predict_cohort`` reports
(the scans alone), as scans per minute, and the ratio 2 processes / 1.

    python benchmarks/cohort.py                 # 6 scans, 2 repeats: about 2 minutes on 2 cores
    python benchmarks/cohort.py --scans 12 --side 384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.models.checkpoint import ModelCard, save_checkpoint
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.pretrain_base import hardware_text

LUNG1 = Path.home() / ".cache/napari-fewlabel/test-data/pyradiomics/lung1_image.nrrd"
CLASSES = 4
SIZE = 256


def write_scans(lung1: Path, folder: Path, n: int, side: int) -> list[Path]:
    """``n`` different ``side`` x ``side`` crops of lung1 (all its slices) as NRRD."""
    image = sitk.ReadImage(str(lung1))
    width = image.GetSize()[0]
    paths = []
    for i in range(n):
        start = min(width - side, 64 + 16 * i)
        path = folder / f"lung1_crop{i:02d}.nrrd"
        sitk.WriteImage(image[start : start + side, start : start + side, :], str(path))
        paths.append(path)
    return paths


def write_model(path: Path, planes: int) -> Path:
    torch.manual_seed(0)
    config = UNetConfig(3, CLASSES)
    card = ModelCard(
        architecture=config.to_dict(),
        classes=default_classes(CLASSES),
        modality="CT",
        normalization=NormalizationConfig.for_modality("CT"),
        input_size=(SIZE, SIZE),
        inference={"planes": [0, 1, 2][:planes], "plane_max_side": SIZE},
    )
    return save_checkpoint(path, TwoStreamUNet(config).eval(), card)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_once(processes: int, model: Path, scans: list[Path], out: Path) -> dict[str, float]:
    """One cohort run in a fresh folder: wall time of the command and predict_cohort's."""
    env = dict(os.environ)
    cli = ["-m", "napari_fewlabel.cli", "predict", str(model), *map(str, scans),
           "--out-dir", str(out), "--device", "cpu"]  # fmt: skip
    if processes == 1:
        env.pop("OMP_NUM_THREADS", None)
        command = [sys.executable, *cli]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        command = [sys.executable, "-m", "torch.distributed.run",
                   f"--nproc_per_node={processes}", f"--master_port={_free_port()}", *cli]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == len(scans), summary
    return {"wall_s": wall, "cohort_s": float(summary["seconds"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lung1", type=Path, default=LUNG1)
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--side", type=int, default=256, help="crop side in voxels (<= 512)")
    parser.add_argument("--planes", type=int, choices=(1, 3), default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not args.lung1.is_file():
        raise SystemExit(f"{args.lung1} missing: run `bash scripts/fetch_test_data.sh`.")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scans = write_scans(args.lung1, folder, args.scans, args.side)
        model = write_model(folder / "model.safetensors", args.planes)
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for processes in (1, 2):
                out = folder / f"out_{processes}_{repeat}"
                runs[processes].append(run_once(processes, model, scans, out))

    def figures(processes: int) -> dict[str, Any]:
        wall = statistics.median(r["wall_s"] for r in runs[processes])
        cohort = statistics.median(r["cohort_s"] for r in runs[processes])
        return {
            "processes": processes,
            "wall_s": round(wall, 2),
            "cohort_s": round(cohort, 2),
            "scans_per_min_wall": round(60 * args.scans / wall, 2),
            "scans_per_min_cohort": round(60 * args.scans / cohort, 2),
            "runs": runs[processes],
        }

    one, two = figures(1), figures(2)
    print(
        json.dumps(
            {
                "machine": hardware_text(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "scans": args.scans,
                "scan_shape": [48, args.side, args.side],
                "planes": args.planes,
                "repeats": args.repeats,
                "one_process": one,
                "two_processes": two,
                "speedup_wall": round(one["wall_s"] / two["wall_s"], 2),
                "speedup_cohort": round(one["cohort_s"] / two["cohort_s"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
