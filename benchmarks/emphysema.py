"""Time of lung segmentation + emphysema scores on real chest CTs, against peers in the same run.

Prints JSON. For each scan (lung1: 512x512x48, lung2: 512x512x61) it times,
alternating and taking the median of several repeats so that machine noise
hits all alike:

* ``read``: ``io.load_volume`` of the file (peer 1),
* ``label``: a bare ``scipy.ndimage.label`` of the volume thresholded at -320 HU
  (peer 2: the cheapest pass any connected-region lung method makes),
* ``segment_lungs`` and ``quantify_emphysema`` (given the lungs), and their sum.

Subtype maps (``infer.subtypes.map_subtypes``, given the lungs): the time per
100 cm^3 of lung and the peak resident memory, for the default subtype network
(DrasCLR widths, 12^3 patches at 2 mm, a patch every 3 voxels = 6 mm) and the
paper's patch geometry (32^3 at 1 mm, a patch every 8 voxels = 8 mm). The
weights are random: the time does not depend on them. Each (scan, network)
runs in its own child process too.

Each scan runs in a child process so that its peak resident memory
(``resource.getrusage``) is its own.

    python benchmarks/emphysema.py [--repeats 5] [--scan lung1_image.nrrd ...] [--no-subtypes]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from scipy import ndimage as ndi

from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.infer.emphysema import quantify_emphysema
from napari_fewlabel.infer.lungs import segment_lungs
from napari_fewlabel.infer.subtypes import SubtypeModel, map_subtypes
from napari_fewlabel.io import load_volume
from napari_fewlabel.models.checkpoint import ModelCard
from napari_fewlabel.models.drasclr import DrasCLRConfig, SubtypeClassifier

DATA = (
    Path(os.environ.get("FEWLABEL_TEST_DATA", Path.home() / ".cache/napari-fewlabel/test-data"))
    / "pyradiomics"
)
DEFAULT_SCANS = [DATA / "lung1_image.nrrd", DATA / "lung2_image.nrrd"]
#: Subtype networks timed: name -> (patch geometry, stride in patch voxels).
SUBTYPE_NETWORKS = {
    "default (12^3 at 2 mm, stride 3)": (DrasCLRConfig(patch_size=12, patch_spacing_mm=2.0), 3),
    "paper patches (32^3 at 1 mm, stride 8)": (DrasCLRConfig(), 8),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(path: Path, repeats: int) -> dict[str, object]:
    """Timings and peak memory for one scan, in this process."""
    scan = load_volume(path)
    rss_loaded = _peak_rss_mb()
    lungs = segment_lungs(scan)  # warm-up; also the result reported below
    report = quantify_emphysema(scan, lungs)
    steps = {
        "read": lambda: load_volume(path),
        "label": lambda: ndi.label(scan.array < -320),
        "segment_lungs": lambda: segment_lungs(scan),
        "quantify_emphysema": lambda: quantify_emphysema(scan, lungs),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    total = median["segment_lungs"] + median["quantify_emphysema"]
    return {
        "scan": path.name,
        "shape_zyx": list(scan.shape),
        "spacing_mm_zyx": [round(s, 4) for s in scan.spacing_mm],
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "lungs_and_scores_s": round(total, 3),
        "ratio_vs_read": round(total / median["read"], 2),
        "ratio_vs_label": round(total / median["label"], 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_reading_mb": round(rss_loaded, 1),
        "laa950_percent": round(report.laa_percent or float("nan"), 3),
        "lung_volume_ml": {
            "right": round(lungs.volume_ml("right"), 1),
            "left": round(lungs.volume_ml("left"), 1),
        },
    }


def measure_subtypes(path: Path, network: str, repeats: int) -> dict[str, object]:
    """Time and peak memory of a dense subtype map of one scan, in this process."""
    config, stride = SUBTYPE_NETWORKS[network]
    scan = load_volume(path)
    lungs = segment_lungs(scan)
    rss_before = _peak_rss_mb()
    card = ModelCard(
        architecture={**config.to_dict(), "task": "emphysema subtypes", "num_classes": 4},
        classes=EMPHYSEMA_SUBTYPES,
        modality="CT",
        normalization=NormalizationConfig("ct_window", window_hu=(-1024.0, 240.0)),
        input_size=(config.patch_size, config.patch_size),
    )
    model = SubtypeModel(SubtypeClassifier(config, 4).eval(), card, config, (1, 2, 3, 4))
    times, patches = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = map_subtypes(model, scan, lungs, stride=stride)
        times.append(time.perf_counter() - t0)
        patches = result.patches
    lung_ml = lungs.volume_ml("both")
    median = statistics.median(times)
    return {
        "scan": path.name,
        "network": network,
        "lung_volume_ml": round(lung_ml, 1),
        "patches": patches,
        "median_s": round(median, 2),
        "s_per_100_ml_lung": round(100 * median / lung_ml, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mapping_mb": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _child(args: list[str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scan", type=Path, nargs="+", default=DEFAULT_SCANS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-subtypes", action="store_true", help="skip the subtype maps")
    parser.add_argument("--subtype-repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-subtypes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = [p for p in args.scan if not p.exists()]
    if missing:
        sys.exit(f"{missing[0]} not found: run `bash scripts/fetch_test_data.sh` first")
    if args.child:
        print(json.dumps(measure(args.scan[0], args.repeats)))
        return
    if args.child_subtypes:
        print(json.dumps(measure_subtypes(args.scan[0], args.child_subtypes, args.repeats)))
        return
    results = [
        _child(["--child", "--repeats", str(args.repeats), "--scan", str(path)])
        for path in args.scan
    ]
    subtypes = []
    if not args.no_subtypes:
        for path in args.scan:
            for network in SUBTYPE_NETWORKS:
                repeats = str(args.subtype_repeats)
                child = ["--child-subtypes", network, "--repeats", repeats, "--scan", str(path)]
                subtypes.append(_child(child))
    print(
        json.dumps(
            {
                "benchmark": "emphysema",
                "repeats": args.repeats,
                "results": results,
                "subtype_maps": subtypes,
                "goal": "lung masks + scores of a 512x512x48 chest CT in a few seconds on CPU",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                f"Python {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
