"""Fuzz every reader for a while and count what happens (issue 24). Prints JSON.

The long run of ``tests/test_fuzz.py``: ``--n`` mutated inputs per format
(NIfTI, NIfTI gzip, NRRD, MetaImage, a DICOM slice among its series, a
safetensors model file), each read in a forked child with a time limit and an
address-space cap (``tests/fuzzing.py``). Counted per format: inputs read,
refused with a FewLabelError, and the failures (escape: another exception
type; crash; hang; memory), with the worst time and peak memory of one input.
Inputs that fail are kept in ``--keep`` to reproduce.

    python benchmarks/fuzz.py [--n 10000] [--formats nifti nrrd] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzzing

FAILURES = ("escape", "crash", "hang", "memory")


def run_format(
    worker: fuzzing.Worker, kind: str, seed: Path, n: int, rand: random.Random, keep: Path
) -> dict[str, Any]:
    counts = {k: 0 for k in ("read", "refused", *FAILURES)}
    worst_s, worst_mb, examples = 0.0, 0.0, []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:

        def record(outcome: fuzzing.Outcome, data: bytes) -> None:
            nonlocal worst_s, worst_mb
            counts[outcome.kind] += 1
            worst_s, worst_mb = max(worst_s, outcome.seconds), max(worst_mb, outcome.max_rss_mb)
            if not outcome.passed:
                keep.mkdir(parents=True, exist_ok=True)
                name = f"{kind}-{sum(counts[f] for f in FAILURES)}{''.join(seed.suffixes)}"
                (keep / name).write_bytes(data)
                if len(examples) < 5:
                    examples.append({"kind": outcome.kind, "detail": outcome.detail, "file": name})

        fuzzing.fuzz(worker, kind, seed, Path(tmp), rand, n, record)
    return {
        "inputs": n,
        **counts,
        "escapes": sum(counts[f] for f in FAILURES),
        "worst_seconds": round(worst_s, 2),
        "worst_max_rss_mb": round(worst_mb, 1),
        "inputs_per_s": round(n / (time.perf_counter() - began), 1),
        "failure_examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="inputs per format")
    parser.add_argument("--formats", nargs="+", default=list(fuzzing.FORMATS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "fewlabel-fuzz")
    args = parser.parse_args()
    rand = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, fuzzing.Worker() as worker:
        seeds = fuzzing.write_seeds(Path(tmp))
        for kind in args.formats:
            results[kind] = run_format(worker, kind, seeds[kind], args.n, rand, args.keep)
            print(f"{kind}: {results[kind]}", file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "benchmark": "fuzz",
                "seed": args.seed,
                "time_limit_s": fuzzing.TIME_LIMIT_S,
                "memory_headroom_gb": fuzzing.MEMORY_HEADROOM / 2**30,
                "reader_limit_gb": float(fuzzing.READER_LIMIT_GB),
                "formats": results,
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
