"""Stop when done (issue 25): the default run with and without the convergence rule.

For each case, the default fine-tuning run (300 steps, the product's settings,
labels on 3 evenly spread axial slices) is done twice in this process, one
after the other: as it is, and with ``FinetuneSettings.stop_when_converged``
(:mod:`napari_fewlabel.train.convergence`), which runs the rest of the
schedule twice as fast once the streams' agreement and the labelled loss have
plateaued. Prints one JSON document: per case and run, the steps done, the
step at which the rule fired, train and predict seconds and the mean Dice on
the unlabelled slices.

    python benchmarks/convergence.py --cache .devdata/cases --mri-case .devdata/mni1mm.npz

Cases come from ``fewslice_cases`` (cached ``.npz`` files, see that module);
``--mri-case`` is the 1 mm MNI152 case of ``speed.py --mri-case``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from annotation_efficiency import evenly_spread
from fewslice_cases import Case, load_case, read_case
from fewslice_suite import score

from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.convergence import ConvergenceRule
from napari_fewlabel.train.events import Done, Notice
from napari_fewlabel.train.finetune import FinetuneJob, FinetuneSettings, run


def one_run(case: Case, settings: FinetuneSettings, device: str, seed: int) -> dict[str, Any]:
    labelled = evenly_spread(case.truth, 3)
    painted = np.zeros_like(case.truth)
    painted[labelled] = case.truth[labelled]
    with tempfile.TemporaryDirectory() as tmp:
        job = FinetuneJob(
            case.image, painted, Path(tmp) / "m.safetensors",
            classes=named_classes(case.class_names), device=device, settings=settings, seed=seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        events = list(run(job))
        trained = time.perf_counter()
        done = events[-1]
        assert isinstance(done, Done)
        prediction = predict_volume(load_checkpoint(done.checkpoint), case.image, device=device)
        finished = time.perf_counter()
    fired = [e.message for e in events if isinstance(e, Notice) and "onverged" in e.message]
    return {
        "steps": done.summary["steps_done"],
        "converged": fired[0] if fired else None,
        "final_stream_agreement": done.summary.get("stream_agreement"),
        "train_seconds": round(trained - t0, 1),
        "predict_seconds": round(finished - trained, 1),
        "mean_dice_unlabelled": round(
            score(prediction, case.truth, labelled, case.class_names)["mean_dice"], 4
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["brain-tumour", "lung-tumour"])
    parser.add_argument("--cache", type=Path, default=Path(".devdata/cases"))
    parser.add_argument("--mri-case", type=Path, help="the 1 mm MNI152 case (.npz)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = [load_case(name, 128, args.cache) for name in args.cases]
    if args.mri_case is not None:
        cases.insert(0, read_case(args.mri_case))
    plain = replace(FinetuneSettings(), stop_when_converged=None)
    early = replace(plain, stop_when_converged=ConvergenceRule())
    results = []
    for case in cases:
        runs = {
            "every_step": one_run(case, plain, args.device, args.seed),
            "stop_when_converged": one_run(case, early, args.device, args.seed),
        }
        a, b = runs["every_step"], runs["stop_when_converged"]
        results.append({
            "case": case.name,
            "shape": list(case.image.shape),
            **runs,
            "train_time_ratio": round(b["train_seconds"] / a["train_seconds"], 3),
            "dice_change": round(b["mean_dice_unlabelled"] - a["mean_dice_unlabelled"], 4),
        })  # fmt: skip
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, torch threads "
                   f"{torch.get_num_threads()}, device {args.device}",
        "rule": ConvergenceRule().__dict__,
        "results": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
