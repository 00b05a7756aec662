"""The labelling loop, simulated: which slice to label next, and what a refine round costs.

A simulated user on real scans (the cases of ``benchmarks/fewslice_cases.py``)
starts from one labelled axial slice (the middle of the structures' extent) and
a full default run on it. Then, in each round, the user labels one more slice
(the reference labels of that slice; a slice without any structure is marked
empty instead) and presses Refine: training goes on from the last model with
all labelled slices for a fifth of the full run's steps (the widget's
``jobs.refine_steps``). The next slice is chosen by

* ``suggest``: our **Label next** (``infer.suggest.suggest_slices``: the slice
  where the model's two streams disagree most);
* ``even``: the slice inside the structures' axial extent farthest from every
  slice labelled so far (what a careful annotator spreading slices does);
* ``random``: a random slice inside the structures' extent (seeded).

After each round the user's mask is the prediction with their own labelled
slices (and empty marks) put back, and its Dice against the reference is
recorded for the whole volume, mean over classes. The target is the same mask
from full supervision: the engine trained for a full run on every other slice
that holds structure. One JSON line per (case, strategy, seed) goes to
``--results``::

    pip install -e .[bench]
    python benchmarks/labelling_loop.py                         # 4 cases, about 40 min on 2 CPU cores
    python benchmarks/labelling_loop.py --cases brain-tumour --rounds 3
    python benchmarks/labelling_loop.py --table                 # Markdown summary
    python benchmarks/labelling_loop.py --plot docs/images/labelling_loop.png

Reported per strategy: the number of slices the user labelled (or marked)
when the mask first reaches 0.9 of the full-supervision Dice (``None`` when it
does not within the rounds), and the wall time of a refine round (train +
predict) against the full run of round 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotation_efficiency import dice_on_unlabelled, evenly_spread
from fewslice_cases import Case, load_case
from fewslice_suite import run_and_predict
from pretraining import _append

from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.infer.suggest import suggest_slices
from napari_fewlabel.jobs import refine_steps
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.device import describe_device
from napari_fewlabel.train.finetune import DEFAULT_STEPS, FinetuneJob, FinetuneSettings

STRATEGIES = ("suggest", "even", "random")
DEFAULT_CASES = ("mni-deep-grey", "itk-head-brain", "brain-tumour", "lung-tumour")
#: The share of the full-supervision Dice a strategy has to reach.
TARGET_SHARE = 0.9


def user_mask(
    pred: np.ndarray, truth: np.ndarray, labelled: list[int], empty: list[int]
) -> np.ndarray:
    """What the user ends up with: the prediction, with their own slices put back."""
    mask = pred.copy()
    mask[labelled] = truth[labelled]
    mask[empty] = 0
    return mask


def whole_volume_dice(mask: np.ndarray, truth: np.ndarray, names: tuple[str, ...]) -> float:
    return float(dice_on_unlabelled(mask, truth, [], names)["mean"])


def structure_extent(truth: np.ndarray) -> np.ndarray:
    """The axial slices from the first to the last that holds any structure."""
    holds = np.flatnonzero(truth.any(axis=(1, 2)))
    return np.arange(int(holds[0]), int(holds[-1]) + 1)


def next_even(extent: np.ndarray, taken: set[int]) -> int:
    """The slice of ``extent`` farthest from every slice taken (the lowest on a tie)."""
    free = [int(z) for z in extent if int(z) not in taken]
    return max(free, key=lambda z: (min(abs(z - t) for t in taken), -z))


def next_random(extent: np.ndarray, taken: set[int], rng: np.random.Generator) -> int:
    free = [int(z) for z in extent if int(z) not in taken]
    return int(rng.choice(free))


def refine_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """A gentle Refine round, tried on 2026-12-05 and not adopted (docs/benchmarks.md).

    A full run's schedule is for a network that knows nothing yet: labelled
    slices alone for the first 30 %, then the unlabelled term ramped in, and
    class weights that favour small structures at first. Run again over a short
    round from a trained model, it dropped Dice after a new slice (0.75 to 0.64,
    0.69 to 0.26 on the brain tumour in benchmarks/labelling_loop.py). Here
    the streams' pseudo-labels are trusted from the first step, the class
    weights are plain, and the learning rate is halved.
    """
    return dataclasses.replace(
        settings,
        supervised_warmup=0.0,
        cps_rampup=0.0,
        class_balance=0.0,
        learning_rate=settings.learning_rate / 2,
    )


def train(
    case: Case,
    labels: np.ndarray,
    empty: list[int],
    steps: int,
    seed: int,
    out: Path,
    start: Path | None,
    args: argparse.Namespace,
) -> tuple[Path, np.ndarray, float]:
    """One run (from ``start`` when given, as Refine does); its model, prediction and wall time."""
    began = time.perf_counter()
    job = FinetuneJob(
        image=case.image,
        labels=labels,
        empty_slices=tuple(empty),
        out=out,
        classes=named_classes(case.class_names),
        model=start,
        axis=0,
        steps=steps,
        seed=seed,
        device=args.device,
        max_input_side=args.max_side,
        settings=(
            refine_settings(FinetuneSettings())
            if start is not None and args.refine == "gentle"
            else FinetuneSettings()
        ),
    )
    done, pred = run_and_predict(job, case.name)
    return done.checkpoint, pred, time.perf_counter() - began


def full_supervision(case: Case, seed: int, workdir: Path, args: argparse.Namespace) -> float:
    """Dice of the user's mask after a full run on every other slice holding structure."""
    holds = case.truth.any(axis=(1, 2))
    labelled = [z for z in range(0, case.truth.shape[0], 2) if holds[z]]
    partial = np.zeros_like(case.truth)
    partial[labelled] = case.truth[labelled]
    _, pred, _ = train(
        case, partial, [], args.steps, seed, workdir / "full.safetensors", None, args
    )
    return whole_volume_dice(
        user_mask(pred, case.truth, labelled, []), case.truth, case.class_names
    )


def loop(
    case: Case,
    strategy: str,
    seed: int,
    first: tuple[Path, np.ndarray, float, int],
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Rounds of label-one-more-slice and refine; Dice and time per round."""
    checkpoint, pred, first_seconds, z0 = first
    truth, names = case.truth, case.class_names
    labelled, empty = [z0], []
    extent = structure_extent(truth)
    rng = np.random.default_rng(seed)
    steps = refine_steps(args.steps)
    rounds = [
        {
            "slices": 1,
            "added": z0,
            "dice": whole_volume_dice(user_mask(pred, truth, labelled, empty), truth, names),
            "wall_s": round(first_seconds, 1),
        }
    ]
    for r in range(1, args.rounds + 1):
        taken = set(labelled) | set(empty)
        began = time.perf_counter()
        if strategy == "suggest":
            model = load_checkpoint(checkpoint)
            z = suggest_slices(model, case.image, n=1, exclude=taken, axis=0, device=args.device)[
                0
            ].index
        elif strategy == "even":
            z = next_even(extent, taken)
        else:
            z = next_random(extent, taken, rng)
        choose_seconds = time.perf_counter() - began
        (labelled if truth[z].any() else empty).append(int(z))
        partial = np.zeros_like(truth)
        partial[labelled] = truth[labelled]
        checkpoint, pred, seconds = train(
            case,
            partial,
            empty,
            steps,
            seed,
            workdir / f"{strategy}-round{r}.safetensors",
            checkpoint,
            args,
        )
        rounds.append(
            {
                "slices": len(labelled) + len(empty),
                "added": int(z),
                "empty": not truth[z].any(),
                "dice": whole_volume_dice(user_mask(pred, truth, labelled, empty), truth, names),
                "wall_s": round(seconds, 1),
                "choose_s": round(choose_seconds, 1),
            }
        )
        print(f"{case.name} {strategy} round {r}: {rounds[-1]}", file=sys.stderr, flush=True)
    return {"refine_steps": steps, "rounds": rounds}


def slices_to_target(rounds: list[dict[str, Any]], target: float) -> int | None:
    for entry in rounds:
        if entry["dice"] >= target:
            return int(entry["slices"])
    return None


def run_loop(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    done = {
        (row["case"], row["strategy"], row["seed"], row["rounds_asked"])
        for row in read_rows(args.results, args.refine)
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    for case_name in args.cases:
        for seed in args.seeds:
            todo = [s for s in args.strategies if (case_name, s, seed, args.rounds) not in done]
            if not todo:
                continue
            case = load_case(case_name, args.max_side, args.case_cache)
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                workdir = Path(tmp)
                full = full_supervision(case, seed, workdir, args)
                z0 = evenly_spread(case.truth, 1)[0]
                partial = np.zeros_like(case.truth)
                partial[z0] = case.truth[z0]
                first = train(
                    case, partial, [], args.steps, seed, workdir / "round0.safetensors", None, args
                )
                for strategy in todo:
                    result = loop(case, strategy, seed, (*first, z0), workdir, args)
                    target = TARGET_SHARE * full
                    _append(
                        args.results,
                        {
                            "case": case_name,
                            "strategy": strategy,
                            "seed": seed,
                            "refine": args.refine,
                            "rounds_asked": args.rounds,
                            "steps": args.steps,
                            "max_side": args.max_side,
                            "full_supervision_dice": round(full, 4),
                            "target_dice": round(target, 4),
                            "slices_to_target": slices_to_target(result["rounds"], target),
                            **result,
                            "device": describe_device(torch.device(args.device)),
                            "torch_threads": args.threads,
                            "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        },
                    )


def read_rows(path: Path, refine: str) -> list[dict[str, Any]]:
    """The rows of runs whose Refine rounds used ``refine`` (rows before the field: full)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("refine", "full") == refine]


def table(args: argparse.Namespace) -> str:
    rows = read_rows(args.results, args.refine)
    cases = sorted({r["case"] for r in rows})
    lines = [
        "| case | full-supervision Dice | "
        + " | ".join(f"{s}: slices to 0.9 of it" for s in STRATEGIES)
        + " | "
        + " | ".join(f"{s}: Dice after each round" for s in STRATEGIES)
        + " |",
        "|" + "---|" * (2 + 2 * len(STRATEGIES)),
    ]
    refine_ratio = []
    reached: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for case in cases:
        by = {r["strategy"]: r for r in rows if r["case"] == case}
        if not by:
            continue
        any_row = next(iter(by.values()))
        cells = [case, f"{any_row['full_supervision_dice']:.3f}"]
        for s in STRATEGIES:
            n = by[s]["slices_to_target"] if s in by else None
            cap = any_row["rounds_asked"] + 1
            cells.append("-" if s not in by else (str(n) if n is not None else f">{cap}"))
            if s in by:
                reached[s].append(n if n is not None else cap + 1)
        for s in STRATEGIES:
            cells.append(
                " / ".join(f"{e['dice']:.2f}" for e in by[s]["rounds"]) if s in by else "-"
            )
        for r in by.values():
            first = r["rounds"][0]["wall_s"]
            refine_ratio += [e["wall_s"] / first for e in r["rounds"][1:]]
        lines.append("| " + " | ".join(cells) + " |")
    summary = ", ".join(
        f"{s} {statistics.mean(v):.2f}" for s, v in reached.items() if v
    )  # not reached counts as rounds + 2
    lines.append("")
    lines.append(f"Mean slices to the target (not reached = rounds + 2): {summary}.")
    if refine_ratio:
        lines.append(
            f"A refine round (train + predict) takes {statistics.mean(refine_ratio):.2f} of the "
            f"first full run (train + predict) on average, {max(refine_ratio):.2f} at most."
        )
    return "\n".join(lines)


def plot(args: argparse.Namespace, out: Path) -> None:
    """Dice after each round, one panel per case, one line per strategy (PIL only)."""
    from PIL import Image, ImageDraw

    rows = read_rows(args.results, args.refine)
    cases = sorted({r["case"] for r in rows})
    colours = {"suggest": (200, 40, 40), "even": (40, 90, 200), "random": (120, 120, 120)}
    w, h, pad = 360, 260, 40
    image = Image.new("RGB", (w * len(cases), h + 30), "white")
    draw = ImageDraw.Draw(image)
    for i, case in enumerate(cases):
        x0 = i * w
        by = {r["strategy"]: r for r in rows if r["case"] == case}
        full = next(iter(by.values()))["full_supervision_dice"]
        values = [e["dice"] for r in by.values() for e in r["rounds"]] + [full]
        lo, hi = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.02)
        n = max(e["slices"] for r in by.values() for e in r["rounds"])

        def xy(slices: float, dice: float, frame: tuple = (x0, lo, hi, n)) -> tuple:
            left, bottom, top, last = frame
            return (
                left + pad + (slices - 1) / max(1, last - 1) * (w - 2 * pad),
                pad + (top - dice) / (top - bottom) * (h - 2 * pad),
            )

        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="black")
        draw.text((x0 + pad, 10), case, fill="black")
        for level, dash in ((full, "full"), (TARGET_SHARE * full, "0.9 full")):
            if lo <= level <= hi:
                y = xy(1, level)[1]
                draw.line([x0 + pad, y, x0 + w - pad, y], fill=(180, 180, 180))
                draw.text((x0 + w - pad + 2, y - 6), dash, fill=(120, 120, 120))
        for tick in np.linspace(lo, hi, 5):
            draw.text((x0 + 4, xy(1, float(tick))[1] - 6), f"{tick:.2f}", fill="black")
        for s in range(1, n + 1):
            draw.text((xy(s, lo)[0] - 3, h - pad + 4), str(s), fill="black")
        for strategy, row in by.items():
            points = [xy(e["slices"], e["dice"]) for e in row["rounds"]]
            draw.line(points, fill=colours[strategy], width=2)
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[strategy])
    legend_y = h + 8
    for j, (strategy, colour) in enumerate(colours.items()):
        draw.line([10 + j * 120, legend_y + 6, 40 + j * 120, legend_y + 6], fill=colour, width=3)
        draw.text((45 + j * 120, legend_y), strategy, fill="black")
    draw.text(
        (400, legend_y), "x: slices labelled or marked empty; y: whole-volume Dice", fill="black"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="a full run's steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=128, help="in-plane size cap (voxels)")
    parser.add_argument("--case-cache", type=Path, help="folder for prepared cases")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "labelling_loop"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "labelling_loop.jsonl",
    )
    parser.add_argument(
        "--refine",
        choices=("gentle", "full"),
        default="full",
        help="the settings of a Refine round: full (a full run's schedule over the short "
        "budget, what the widget does) or gentle (refine_settings here, tried and not adopted)",
    )
    parser.add_argument("--table", action="store_true", help="print the Markdown summary only")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args))
    elif args.plot:
        plot(args, args.plot)
    else:
        run_loop(args)


if __name__ == "__main__":
    main()
