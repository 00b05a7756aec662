"""Turn annotation_efficiency.py's JSON lines into the markdown tables of docs/benchmarks.md.

    python benchmarks/tabulate_annotation_efficiency.py annotation_efficiency.jsonl --mm 2

Each cell is the mean Dice (grey + white matter) on the unlabelled slices,
averaged over the seeds present, with the number of seeds and, from two seeds
on, the spread (min-max) in brackets.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--mm", type=int, default=2)
    parser.add_argument("--score", choices=("plain", "tta"), default="plain")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("mm", 1) == args.mm]
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["k"])].append(r[args.score]["mean"])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    print(f"| method | {' | '.join(f'k = {k}' for k in ks)} |")
    print(f"|---|{'---|' * len(ks)}")
    for m in methods:
        out = []
        for k in ks:
            v = cells.get((m, k))
            if not v:
                out.append("")
            elif len(v) == 1:
                out.append(f"{v[0]:.3f}")
            else:
                out.append(f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f}, n={len(v)})")
        print(f"| {m} | {' | '.join(out)} |")


if __name__ == "__main__":
    main()
