"""Time to open lung1 (512x512x48 CT, NRRD) through our reader vs a bare SimpleITK read.

Prints JSON. Goal: ratio <= 1.2. Both are timed in the same process, alternating,
median of several repeats, so machine noise hits both alike.

    python benchmarks/read_volume.py [--repeats 9] [--path lung1_image.nrrd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from napari_fewlabel.io import load_volume
from napari_fewlabel.napari._reader import get_reader

DEFAULT = (
    Path(os.environ.get("FEWLABEL_TEST_DATA", Path.home() / ".cache/napari-fewlabel/test-data"))
    / "pyradiomics/lung1_image.nrrd"
)


def _bare_sitk(path: Path) -> None:
    sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _ours(path: Path) -> None:
    load_volume(path)


def _napari_reader(path: Path) -> None:
    reader = get_reader(str(path))
    assert reader is not None
    reader(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not args.path.exists():
        sys.exit(f"{args.path} not found: run `bash scripts/fetch_test_data.sh` first")

    candidates = {"sitk": _bare_sitk, "load_volume": _ours, "napari_reader": _napari_reader}
    for fn in candidates.values():  # warm the file cache and imports
        fn(args.path)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn(args.path)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "read_volume",
                "file": args.path.name,
                "repeats": args.repeats,
                "median_s": {k: round(v, 4) for k, v in median.items()},
                "ratio_load_volume_vs_sitk": round(median["load_volume"] / median["sitk"], 3),
                "ratio_napari_reader_vs_sitk": round(median["napari_reader"] / median["sitk"], 3),
                "goal": "ratio <= 1.2",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
