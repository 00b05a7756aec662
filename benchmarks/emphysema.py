"""Time of lung segmentation + emphysema scores on real chest CTs, against peers in the same run.

Prints JSON. For each scan (lung1: 512x512x48, lung2: 512x512x61) it times,
alternating and taking the median of several repeats so that machine noise
hits all alike:

* ``read``: ``io.load_volume`` of the file (peer 1),
* ``label``: a bare ``scipy.ndimage.label`` of the volume thresholded at -320 HU
  (peer 2: the cheapest pass any connected-region lung method makes),
* ``segment_lungs`` and ``quantify_emphysema`` (given the lungs), and their sum.

Each scan runs in a child process so that its peak resident memory
(``resource.getrusage``) is its own.

    python benchmarks/emphysema.py [--repeats 5] [--scan lung1_image.nrrd ...]
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

from scipy import ndimage as ndi

from napari_fewlabel.infer.emphysema import quantify_emphysema
from napari_fewlabel.infer.lungs import segment_lungs
from napari_fewlabel.io import load_volume

DATA = (
    Path(os.environ.get("FEWLABEL_TEST_DATA", Path.home() / ".cache/napari-fewlabel/test-data"))
    / "pyradiomics"
)
DEFAULT_SCANS = [DATA / "lung1_image.nrrd", DATA / "lung2_image.nrrd"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scan", type=Path, nargs="+", default=DEFAULT_SCANS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = [p for p in args.scan if not p.exists()]
    if missing:
        sys.exit(f"{missing[0]} not found: run `bash scripts/fetch_test_data.sh` first")
    if args.child:
        print(json.dumps(measure(args.scan[0], args.repeats)))
        return
    results = []
    for path in args.scan:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--repeats",
                str(args.repeats),
                "--scan",
                str(path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout))
    print(
        json.dumps(
            {
                "benchmark": "emphysema",
                "repeats": args.repeats,
                "results": results,
                "goal": "lung masks + scores of a 512x512x48 chest CT in a few seconds on CPU",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
