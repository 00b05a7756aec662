"""MRI -> CT adaptation (Dou et al. 2018) on the synthetic cardiac phantom pair.

    python benchmarks/adaptation.py > benchmarks/results/adaptation.json  # ~15 min, 2 CPU cores
    python benchmarks/adaptation.py --objective gp --adapt-steps 900 \
        > benchmarks/results/adaptation_gp.json                             # ~11 min

A source model is trained supervised on the MR phantom (seed 0, every slice
labelled, 3 adjacent slices as input). The target is the CT phantom of another
"patient" (seed 1); its labels only score. Figures, mean Dice over the five
structures on the whole CT volume:

* ``source_on_ct``: the MR model applied to the CT as `fewlabel predict` does
  (the CT normalised the way the model's card says: MR percentiles + z-score);
* ``source_on_ct_hu_window``: the MR model fed the CT through the HU window, the
  adapted model's input and the DAM's starting point;
* ``adapted``: after `fewlabel adapt` (no CT label used);
* ``ct_supervised``: upper bound, the same network trained supervised on the
  labelled CT phantom of seed 0 with the same steps.
* ``source_on_mr``: the MR model on the MR phantom of seed 1, for scale.

The real head pair of DATA.md (ITK head T1 -> InVesalius head CT, key ``head``):
the same figures, Dice of "head (not brain)" and "brain" and their mean on the
CT's cerebrum slices, with labels derived as benchmarks/head_pair.py documents;
``ct_supervised_same_scan`` is trained and scored on the one CT (an optimistic
upper bound: there is no second labelled head CT). ``--only phantom|head``
runs one pair (about 6 and 8 minutes on 2 CPU cores).

``--measure-checks`` measures the label-free checks instead
(:mod:`napari_fewlabel.train.adapt_check`): every ``--check-every`` joint
updates (and at the start) the adapted network is written, scored by every
candidate on the CT without labels and by its true Dice; per candidate the
JSON gives Spearman's rho between the candidate (signed so that higher means
better) and the true Dice over the checkpoints, and the true Dice of the
checkpoint the candidate would keep with no margin (the start unless one
beats it); ``adapted_true_dice`` is the model adaptation wrote (the default
check, with its margin). The
critic's Wasserstein estimate at the check step is one more candidate (lower
is better; no value at the start). No supervised upper bound is trained::

    python benchmarks/adaptation.py --measure-checks --only head --adapt-steps 150

``--one-ct-slice`` compares, with one labelled CT slice (the one with the
most foreground; on the head pair, the most brain): fine-tuning from the MR
model on that slice alone (`fewlabel finetune --model mr.safetensors`, the
default method, ``--finetune-steps``; the CT goes through the MR model's own
normalisation), the same with the CT through the HU window instead,
adaptation with that slice as ``--target-labels`` (``--adapt-steps``), and
that adapted model fine-tuned on the slice (both); all scored on the whole
CT as above. ``--critic-region anatomy`` runs any of these with the critic
on the anatomy only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import head_pair as head_pair_data
import numpy as np
import torch
from head_pair import HeadScan
from scipy.stats import spearmanr

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.phantoms import CardiacPhantom, cardiac_phantom
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io import Volume
from napari_fewlabel.models.checkpoint import (
    SegmentationModel,
    load_checkpoint,
    save_checkpoint,
)
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import adapt, finetune
from napari_fewlabel.train.adapt_check import HIGHER_IS_BETTER
from napari_fewlabel.train.events import Done, Progress


def mean_dice(model: SegmentationModel, phantom: CardiacPhantom) -> float:
    pred = predict_volume(model, phantom.image, device="cpu")
    truth = phantom.labels.array
    scores = []
    for k in range(1, len(phantom.classes)):
        p, t = pred == k, truth == k
        denom = int(p.sum() + t.sum())
        scores.append(2 * int((p & t).sum()) / denom if denom else 1.0)
    return round(float(np.mean(scores)), 4)


def train_supervised(
    scan: CardiacPhantom | HeadScan,
    classes: tuple[SegmentationClass, ...],
    out: Path,
    steps: int,
    net: UNetConfig,
    device: str,
) -> Path:
    """A model trained supervised on every slice of ``scan`` (labels all there).

    Kept when ``out`` is already there (``--work-dir`` reused: same settings assumed).
    """
    if out.is_file():
        return out
    job = finetune.FinetuneJob(
        image=scan.image,
        labels=scan.labels,
        out=out,
        classes=classes,
        model="random",
        steps=steps,
        device=device,
        settings=replace(finetune.FinetuneSettings.supervised(), validation_min_labelled=10_000),
        architecture=net,
        checkpoint_every_s=1e9,
    )
    for _ in finetune.run(job):
        pass
    return out


def phantom_pair(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    shape, spacing = (32, 96, 96), (3.0, 2.0, 2.0)
    net = UNetConfig(in_slices=3, widths=(8, 16, 32, 64), full_res_width=4)
    mr = cardiac_phantom("MR", 0, shape, spacing)
    ct = cardiac_phantom("CT", 1, shape, spacing)
    t0 = time.perf_counter()
    source = train_supervised(
        mr, mr.classes, folder / "mr.safetensors", args.source_steps, net, args.device
    )
    source_model = load_checkpoint(source)
    window = NormalizationConfig("ct_window")
    as_ct = replace(source_model, card=replace(source_model.card, normalization=window))
    row: dict[str, Any] = {
        "shape_zyx": list(shape),
        "network_widths": list(net.widths),
        "source_steps": args.source_steps,
        "adapt_steps": args.adapt_steps,
        "adapt_settings": {
            "objective": args.objective,
            "critic_updates": settings_from(args).critic_updates,
            "critic_region": args.critic_region,
            "region_from": args.region_from,
            "seed": args.seed,
        },
        "source_on_mr": mean_dice(source_model, cardiac_phantom("MR", 1, shape, spacing)),
        "source_on_ct": mean_dice(source_model, ct),
        "source_on_ct_hu_window": mean_dice(as_ct, ct),
    }
    if args.one_ct_slice:
        slice_index = int(np.argmax((ct.labels.array > 0).sum(axis=(1, 2))))
        row["one_ct_slice"] = one_slice(
            source, ct.image, ct.labels, mr.image, slice_index, ct.classes, folder, args,
            lambda m: mean_dice(m, ct),
        )  # fmt: skip
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    if args.measure_checks:
        row["checks"] = measure_checks(
            source, ct.image, mr.image, folder / "checks", args, lambda m: mean_dice(m, ct),
            regions_from_labels(args, mr.labels, ct.labels),
        )  # fmt: skip
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    adapted, curve, seconds = adapt_to(
        source, ct.image, mr.image, folder / "adapted.safetensors", args
    )
    row["adapted"] = mean_dice(load_checkpoint(adapted), ct)
    row["adapt_seconds"] = seconds
    row["wasserstein_every_10_steps"] = curve
    upper = train_supervised(
        cardiac_phantom("CT", 0, shape, spacing),
        ct.classes,
        folder / "ct.safetensors",
        args.source_steps,
        net,
        args.device,
    )
    row["ct_supervised"] = mean_dice(load_checkpoint(upper), ct)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def regions_from_labels(
    args: argparse.Namespace, mr_labels: Volume, ct_labels: Volume
) -> dict[str, Any] | None:
    """With ``--region-from labels``: the MR labels and the CT labels' bounding box as the
    critic's regions (what a user gives with --source-labels and --target-box)."""
    if args.region_from != "labels":
        return None
    where = np.nonzero(ct_labels.array)
    box = tuple((int(w.min()), int(w.max()) + 1) for w in where)
    return {"source_labels": mr_labels, "target_box": box}


def settings_from(args: argparse.Namespace) -> adapt.AdaptSettings:
    """The paper's weight clipping (default) or the WGAN-GP preset, as ``fewlabel adapt`` builds them."""
    return adapt.AdaptSettings.for_objective(
        args.objective,
        warmup_steps=args.warmup,
        check_every=args.check_every,
        critic_region=args.critic_region,
    )


def one_slice(
    source: Path,
    ct: Volume,
    ct_labels: Volume,
    mri: Volume,
    slice_index: int,
    classes: tuple[SegmentationClass, ...],
    folder: Path,
    args: argparse.Namespace,
    true_dice: Any,
) -> dict[str, Any]:
    """Fine-tuning from the MR model on one CT slice vs adaptation with that slice, then both."""
    painted = np.zeros_like(ct_labels.array)
    painted[slice_index] = ct_labels.array[slice_index]
    labels = ct_labels.with_array(painted)

    def tune(start: Path, out: Path) -> Path:
        job = finetune.FinetuneJob(
            image=ct,
            labels=labels,
            out=out,
            classes=classes,
            model=start,
            steps=args.finetune_steps,
            device=args.device,
            checkpoint_every_s=1e9,
        )
        for _ in finetune.run(job):
            pass
        return out

    t0 = time.perf_counter()
    tuned = tune(source, folder / "tuned-one-slice.safetensors")
    finetune_seconds = round(time.perf_counter() - t0, 1)
    # The same, but the CT fed through the HU window (adaptation's start) instead of the
    # MR model's own normalisation: how much of "both" is the window alone.
    mr_model = load_checkpoint(source)
    windowed = save_checkpoint(
        folder / "mr-hu-window.safetensors",
        mr_model.network,
        replace(mr_model.card, normalization=NormalizationConfig("ct_window")),
    )
    tuned_windowed = tune(windowed, folder / "tuned-one-slice-hu-window.safetensors")
    t0 = time.perf_counter()
    job = adapt.AdaptJob(
        source_model=source,
        target=(ct,),
        target_labels=labels,
        source=(mri,),
        out=folder / "adapted-one-slice.safetensors",
        steps=args.adapt_steps,
        device=args.device,
        settings=settings_from(args),
        seed=args.seed,
        checkpoint_every_s=1e9,
    )
    done = None
    for event in adapt.run(job):
        if isinstance(event, Done):
            done = event
    assert done is not None
    adapt_seconds = round(time.perf_counter() - t0, 1)
    both = tune(job.out, folder / "adapted-one-slice-then-tuned.safetensors")
    return {
        "slice": slice_index,
        "finetune_steps": args.finetune_steps,
        "finetune_from_mr_model_on_the_slice": true_dice(load_checkpoint(tuned)),
        "finetune_seconds": finetune_seconds,
        "finetune_from_mr_model_hu_window_on_the_slice": true_dice(load_checkpoint(tuned_windowed)),
        "adapted_with_the_slice": true_dice(load_checkpoint(job.out)),
        "adapt_verdict": done.summary.get("verdict"),
        "adapt_seconds": adapt_seconds,
        # What the widget's user does next: fine-tune the adapted model on the same slice.
        "adapted_with_the_slice_then_finetuned": true_dice(load_checkpoint(both)),
    }


def measure_checks(
    source: Path,
    target: Volume,
    mri: Volume,
    folder: Path,
    args: argparse.Namespace,
    true_dice: Any,
    regions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every checked checkpoint's label-free scores against its true Dice (``true_dice(model)``).

    ``regions``: ``source_labels`` / ``target_box`` of the AdaptJob (``--region-from labels``).
    """
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    job = adapt.AdaptJob(
        **(regions or {}),
        source_model=source,
        target=(target,),
        source=(mri,),
        out=folder / "adapted.safetensors",
        steps=args.adapt_steps,
        device=args.device,
        settings=settings_from(args),
        seed=args.seed,
        checkpoint_every_s=1e9,
        checkpoints_dir=folder,
    )
    wasserstein: dict[int, float] = {}
    done = None
    for event in adapt.run(job):
        if isinstance(event, Progress) and "check_entropy" in event.extra:
            wasserstein[event.step] = event.extra["wasserstein_mean"]
        if isinstance(event, Done):
            done = event
    assert done is not None
    rows = []
    for scores in done.summary["checks"]:
        step = int(scores["step"])
        dice = true_dice(load_checkpoint(folder / f"step_{step}.safetensors"))
        dice = dice["mean"] if isinstance(dice, dict) else dice
        row = {"step": step, "true_dice": dice}
        row.update({k: round(v, 4) for k, v in scores.items() if k != "step"})
        if step in wasserstein:
            row["wasserstein"] = round(wasserstein[step], 4)
        rows.append(row)
    higher = {**HIGHER_IS_BETTER, "wasserstein": False}
    candidates: dict[str, Any] = {}
    for name, up in higher.items():
        have = [r for r in rows if name in r]
        signed = [r[name] if up else -r[name] for r in have]
        rho = spearmanr(signed, [r["true_dice"] for r in have]).statistic
        # As adaptation keeps: the first of the best (the start when none beats it).
        best = have[int(np.argmax(signed))]
        candidates[name] = {
            "spearman": None if not np.isfinite(rho) else round(float(rho), 3),
            "kept_step": best["step"],
            "kept_true_dice": best["true_dice"],
        }
    kept = true_dice(load_checkpoint(job.out))
    return {
        "objective": args.objective,
        "adapt_steps": args.adapt_steps,
        "check_every": args.check_every,
        "adapted_true_dice": kept["mean"] if isinstance(kept, dict) else kept,
        "adapted_selection": done.summary["selection"],
        "start_true_dice": rows[0]["true_dice"],
        "last_true_dice": rows[-1]["true_dice"],
        "best_true_dice": max(r["true_dice"] for r in rows),
        "candidates": candidates,
        "checkpoints": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def adapt_to(
    source: Path, target: Volume, mri: Volume, out: Path, args: argparse.Namespace
) -> tuple[Path, list[list[float]], float]:
    """``fewlabel adapt`` as a library call: the adapted model, its Wasserstein curve, seconds."""
    t0 = time.perf_counter()
    job = adapt.AdaptJob(
        source_model=source,
        target=(target,),
        source=(mri,),
        out=out,
        steps=args.adapt_steps,
        device=args.device,
        settings=settings_from(args),
        seed=args.seed,
        checkpoint_every_s=1e9,
    )
    curve = []
    for event in adapt.run(job):
        if isinstance(event, Progress) and event.step % 10 == 0:
            curve.append([event.step, round(event.losses["wasserstein"], 3)])
    return job.out, curve, round(time.perf_counter() - t0, 1)


def head_pair(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """ITK head T1 (labelled) -> InVesalius head CT; labels derived as benchmarks/head_pair.py says."""
    mr, ct = head_pair_data.mri_head(), head_pair_data.ct_head()
    classes = head_pair_data.HEAD_CLASSES
    net = UNetConfig(in_slices=3, widths=(8, 16, 32, 64), full_res_width=4)
    t0 = time.perf_counter()
    source = train_supervised(
        mr, classes, folder / "head-mr.safetensors", args.source_steps, net, args.device
    )
    source_model = load_checkpoint(source)
    window = NormalizationConfig("ct_window")
    as_ct = replace(source_model, card=replace(source_model.card, normalization=window))

    def score(model: SegmentationModel) -> dict[str, float]:
        pred = predict_volume(model, ct.image, device=args.device)
        return head_pair_data.dice_per_class(pred, ct.labels.array, ct.scored_slices)

    row: dict[str, Any] = {
        "grid": "both resampled to 2 mm isotropic",
        "mr_shape_zyx": list(mr.image.shape),
        "ct_shape_zyx": list(ct.image.shape),
        "ct_scored_slices": [int(ct.scored_slices[0]), int(ct.scored_slices[-1])],
        "source_steps": args.source_steps,
        "adapt_steps": args.adapt_steps,
        "adapt_settings": {
            "objective": args.objective,
            "critic_updates": settings_from(args).critic_updates,
            "critic_region": args.critic_region,
            "region_from": args.region_from,
            "seed": args.seed,
        },
        "source_on_ct": score(source_model),
        "source_on_ct_hu_window": score(as_ct),
    }
    if args.one_ct_slice:
        slice_index = int(np.argmax((ct.labels.array == 2).sum(axis=(1, 2))))
        row["one_ct_slice"] = one_slice(
            source, ct.image, ct.labels, mr.image, slice_index, classes, folder, args,
            lambda m: score(m)["mean"],
        )  # fmt: skip
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    if args.measure_checks:
        row["checks"] = measure_checks(
            source, ct.image, mr.image, folder / "checks", args, score,
            regions_from_labels(args, mr.labels, ct.labels),
        )  # fmt: skip
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    adapted, curve, seconds = adapt_to(
        source, ct.image, mr.image, folder / "head-ct.safetensors", args
    )
    row["adapted"] = score(load_checkpoint(adapted))
    row["adapt_seconds"] = seconds
    row["wasserstein_every_10_steps"] = curve
    upper = train_supervised(
        ct, classes, folder / "head-ct-sup.safetensors", args.source_steps, net, args.device
    )
    row["ct_supervised_same_scan"] = score(load_checkpoint(upper))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source-steps", type=int, default=700)
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--objective",
        choices=("clip", "gp"),
        default="clip",
        help="clip: the paper's weight clipping, 20 critic updates; gp: WGAN-GP, 5",
    )
    parser.add_argument("--only", choices=("phantom", "head"), help="run one of the two pairs")
    parser.add_argument(
        "--critic-region",
        choices=("whole", "anatomy"),
        default="whole",
        help="what the critic compares (fewlabel adapt --critic-region)",
    )
    parser.add_argument(
        "--region-from",
        choices=("prediction", "labels"),
        default="prediction",
        help="with --critic-region anatomy and --measure-checks: the regions from the source "
        "model's prediction (default) or from the MR labels and the CT labels' bounding box",
    )
    parser.add_argument(
        "--measure-checks",
        action="store_true",
        help="score every checked checkpoint by the label-free checks and by its true Dice",
    )
    parser.add_argument("--check-every", type=int, default=25, metavar="STEPS")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the adaptation runs (the source models are trained with seed 0 always)",
    )
    parser.add_argument(
        "--one-ct-slice",
        action="store_true",
        help="fine-tuning from the MR model on one CT slice vs adaptation with that slice",
    )
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the models here and reuse the source models trained there (default: a "
        "temporary folder)",
    )
    args = parser.parse_args()
    if args.region_from == "labels":
        args.critic_region = "anatomy"
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = str(args.work_dir)
        if args.only in (None, "phantom"):
            torch.manual_seed(0)
            result["phantom"] = phantom_pair(args, Path(tmp))
        if args.only in (None, "head") and head_pair_data.available():
            torch.manual_seed(0)
            result["head"] = head_pair(args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
