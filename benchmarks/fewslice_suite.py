"""Few-slice suite: our engine and classical peers on the same labelled slices of real scans.

Every method gets the reference labels of ``k`` axial slices of a real scan
and segments the whole volume; Dice is measured on the slices it did not see.
One JSON line per (case, method, k, seed) is appended to ``--results`` (a
long run resumes where it stopped) and printed on stderr::

    pip install -e .[bench]
    python benchmarks/fewslice_suite.py                        # everything (hours on a CPU)
    python benchmarks/fewslice_suite.py --cases brain-tumour lungs-lr --k 1 3 \\
        --methods interp rf monai ours "ours[planes=all]" --seeds 0 1
    python benchmarks/fewslice_suite.py --table                # Markdown summary
    python benchmarks/fewslice_suite.py --device cuda --case-cache cases/ \
        --results benchmarks/results/fewslice_suite_gpu.jsonl    # on a GPU (gpu_checks.sh)

Cases (``benchmarks/fewslice_cases.py``; display orientation ``(z, y, x)``,
labelled axis = axis 0, axial; no expert drew any of these labels):

* ``mni-gm-wm``: MNI152 2009c T1 at 2 mm (nilearn); grey/white matter = the
  larger probability map where max(GM, WM) >= 0.5 (``annotation_efficiency.py``).
* ``mni-deep-grey``: the same T1; small lateral structures: the grey-matter
  label inside a box around the basal ganglia, each voxel given to the nearest
  of six seeds (left/right caudate, putamen, thalamus, MNI RAS+ mm) and dropped
  beyond 12 mm from all of them. About 500 voxels and 11 slices per nucleus.
* ``itk-head-brain``: the ITK example head T1 (``KmeansTest_T1UCharRaw``);
  brain = ``KmeansTest_T1RawSkullStrip`` > 0.
* ``brain-tumour``: pyradiomics brain1 MRI (25 slices of 6.5 mm, strongly
  anisotropic); tumour = ``brain1_label`` > 0.
* ``lung-tumour``: pyradiomics lung2 CT; tumour = ``lung2_label`` > 0.
* ``lungs-lr``: pyradiomics lung1 CT; right and left lung from the classical
  ``infer.lungs.segment_lungs`` at full resolution.
* ``head-ct``: the InVesalius example head CT (``Cranium.inv3``); bone = its
  bone threshold mask, soft tissue = its soft-tissue-and-bone mask minus bone.

Downsampling: scans wider than ``--max-side`` (128) voxels in-plane are
reduced by one integer factor in y and x, never along axis 0 (block mean for
the image, block majority for the labels, spacing and affine scaled), so that
one method on one case costs about a minute on a CPU.

Labelled slices: ``k`` slices evenly spread over the axial extent of the slices
holding any structure (``annotation_efficiency.evenly_spread``); the partial
label map is the reference on those slices and 0 elsewhere.

Score: Dice per foreground class over all non-labelled slices that hold any
structure (prediction and reference voxels on those slices), their mean
(``mean_dice``), ``fp_voxels_empty_slices`` (voxels predicted as any structure
on non-labelled slices holding none), and ``wall_s`` (train + predict).

Methods:

* ``interp``: ITK morphological contour interpolation
  (``itk.MorphologicalContourInterpolator``, all labels, along the labelled
  axis only) of the partial labels; with k = 1 it returns the one slice.
* ``rf``: a random forest (100 trees) on 3D filter features of the normalised
  image (Gaussian, gradient magnitude, Laplacian of Gaussian at 0.7-10 voxels,
  differences of Gaussians, voxel position), trained on the labelled slices:
  the ilastik / napari-convpaint approach.
* ``monai``: a plain MONAI 2D UNet of our network's size on the labelled
  slices, same steps (``annotation_efficiency.train_monai``).
* ``upper``: that MONAI UNet trained with full supervision on every even slice
  holding structure, scored on the others: an upper reference, once per case
  and seed (``k`` is null).
* ``ours`` and ``ours[key=value,...]``: our fine-tuning (``FinetuneJob``) with
  ``FinetuneSettings`` fields overridden (values parsed as JSON, else kept as
  strings; ``augment.flips=true`` reaches a nested field), from the product's
  default start (``--random-init``: a random one), predicted along the axis its
  model card names.

``rf`` and ``interp`` are deterministic: they run for ``--peer-seeds`` (0)
only, and their rows carry ``steps`` = null.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from annotation_efficiency import dice_on_unlabelled, evenly_spread, train_monai
from fewslice_cases import CASE_LOADERS, Case, describe, load_case
from pretraining import _append, cpu_model, foreground_on_empty_slices

from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.device import describe_device, resolve_device
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import (
    DEFAULT_STEPS,
    RANDOM_INIT,
    FinetuneJob,
    FinetuneSettings,
    run,
)

#: Methods that do not train a network: deterministic, independent of ``--steps``.
DETERMINISTIC_PEERS = ("interp", "rf")
#: Every peer of our engine (the "best peer" column of the table).
PEERS = (*DETERMINISTIC_PEERS, "monai")
PLAIN_METHODS = (*PEERS, "upper", "ours")
#: Random-forest features: Gaussian scales in voxels (ilastik's default set).
RF_SIGMAS_VOXELS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
#: At most this many training voxels for the random forest, shared among the classes.
RF_MAX_TRAINING_VOXELS = 60_000
#: Voxels per chunk when the random forest predicts the volume.
RF_PREDICT_CHUNK_VOXELS = 262_144
#: The fields that identify a row: a row with the same values is not run again.
ROW_KEY = ("case", "method", "init", "k", "seed", "steps", "max_side")


# ----------------------------------------------------------- labelled slices
def partial_labels(truth: np.ndarray, k: int) -> tuple[np.ndarray, list[int]]:
    """The reference on ``k`` evenly spread axial slices (0 elsewhere) and those slices."""
    labelled = sorted(set(evenly_spread(truth, k)))
    partial = np.zeros_like(truth)
    partial[labelled] = truth[labelled]
    return partial, labelled


def score(
    pred: np.ndarray, truth: np.ndarray, labelled: list[int], class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Dice per class on the unlabelled slices holding structure; false positives elsewhere."""
    holds_structure = truth.any(axis=(1, 2))
    scored = [z for z in np.flatnonzero(holds_structure) if z not in labelled]
    not_scored = [z for z in range(truth.shape[0]) if z not in scored]
    dice = dice_on_unlabelled(pred, truth, not_scored, class_names)
    mean = dice.pop("mean")
    return {
        "scored_slices": len(scored),
        "dice": dice,
        "mean_dice": mean,
        "fp_voxels_empty_slices": foreground_on_empty_slices(pred, truth, labelled),
    }


# ------------------------------------------------------------------- methods
def interpolate_contours(partial: np.ndarray, threads: int = 2) -> tuple[np.ndarray, float]:
    """ITK morphological contour interpolation of every label along numpy axis 0.

    numpy ``(z, y, x)`` is ITK ``(x, y, z)``: numpy axis 0 is ITK axis 2.
    Interpolation along the other axes is off (``axis=-1`` would use all three).
    Returns the labels and the seconds the filter took (ITK's lazy module
    loading, several seconds, is not counted).
    """
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    image = itk.image_from_array(np.ascontiguousarray(partial, dtype=np.uint8))
    itk.morphological_contour_interpolator  # noqa: B018 (load the module before timing)
    start = time.perf_counter()
    result = itk.morphological_contour_interpolator(image, axis=2, label=0)
    seconds = time.perf_counter() - start
    return np.asarray(itk.array_from_image(result), dtype=np.uint8), seconds


def interpolate_contours_apart(partial: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """:func:`interpolate_contours` in a fresh process: ITK beside SimpleITK in one process
    was seen to corrupt the heap (a malloc abort at exit after the lungs case)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(interpolate_contours, partial, threads).result()


def voxel_features(case: Case) -> np.ndarray:
    """Per-voxel 3D filter features of the normalised image, ``(z, y, x, features)`` float32.

    The normalised intensity; per sigma (voxels) the Gaussian, its gradient
    magnitude and Laplacian; differences of consecutive Gaussians; and the
    voxel position (z, y, x) scaled to [0, 1].
    """
    volume = case.image
    intensity = fit_intensity(volume.array, NormalizationConfig.for_modality(volume.modality))
    normalised = intensity(volume.array)
    features = [normalised]
    smoothed = []
    for sigma in RF_SIGMAS_VOXELS:
        gaussian = ndimage.gaussian_filter(normalised, sigma)
        smoothed.append(gaussian)
        features += [
            gaussian,
            ndimage.gaussian_gradient_magnitude(normalised, sigma),
            ndimage.gaussian_laplace(normalised, sigma),
        ]
    features += [fine - coarse for fine, coarse in itertools.pairwise(smoothed)]
    for axis, size in enumerate(volume.shape):
        position = np.linspace(0.0, 1.0, size, dtype=np.float32)
        shape = [1, 1, 1]
        shape[axis] = size
        features.append(np.broadcast_to(position.reshape(shape), volume.shape))
    return np.stack(features, axis=-1).astype(np.float32, copy=False)


def random_forest(
    case: Case, partial: np.ndarray, labelled: list[int], seed: int, threads: int
) -> np.ndarray:
    """Train a random forest on the labelled slices' voxels and label the whole volume."""
    from sklearn.ensemble import RandomForestClassifier

    features = voxel_features(case)
    train_x = features[labelled].reshape(-1, features.shape[-1])
    train_y = partial[labelled].reshape(-1)
    rng = np.random.default_rng(seed)
    present = np.unique(train_y)
    per_class_cap = RF_MAX_TRAINING_VOXELS // len(present)
    chosen = []
    for label in present:
        voxels = np.flatnonzero(train_y == label)
        if voxels.size > per_class_cap:
            voxels = rng.choice(voxels, per_class_cap, replace=False)
        chosen.append(voxels)
    pick = np.concatenate(chosen)
    forest = RandomForestClassifier(n_estimators=100, n_jobs=threads, random_state=seed)
    forest.fit(train_x[pick], train_y[pick])
    del train_x
    pred = np.zeros(case.truth.shape, dtype=np.uint8)
    slices_per_chunk = max(1, RF_PREDICT_CHUNK_VOXELS // (features.shape[1] * features.shape[2]))
    for start in range(0, features.shape[0], slices_per_chunk):
        chunk = features[start : start + slices_per_chunk]
        labels = forest.predict(chunk.reshape(-1, chunk.shape[-1]))
        pred[start : start + slices_per_chunk] = labels.reshape(chunk.shape[:-1])
    return pred


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``"ours[planes=all,cps_weight=0.5]"`` -> ``("ours", {"planes": "all", "cps_weight": 0.5})``.

    Commas inside brackets or braces belong to the value (``planes=[0,1]``).
    Other methods must be one of :data:`PLAIN_METHODS`, without brackets.
    """
    if not method.startswith("ours[") or not method.endswith("]"):
        if method not in PLAIN_METHODS:
            raise SystemExit(
                f"unknown method {method!r}: use {', '.join(PLAIN_METHODS)} or ours[key=value,...]"
            )
        return method, {}
    body, items, depth, current = method[len("ours[") : -1], [], 0, ""
    for char in body:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides: dict[str, Any] = {}
    for item in filter(str.strip, items):
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"{method}: {item!r} is not key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text.strip()
        overrides[key.strip()] = tuple(value) if isinstance(value, list) else value
    settings_with(overrides)  # fail now, before any case is loaded
    return "ours", overrides


def _replace_field(settings: Any, dotted: str, value: Any, method_key: str) -> Any:
    """``settings`` with the (possibly nested, ``a.b``) dataclass field ``dotted`` set."""
    name, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(settings)]
    if name not in names:
        raise SystemExit(
            f"{type(settings).__name__} has no field {name!r} (in {method_key!r}); "
            f"its fields are: {', '.join(names)}"
        )
    if rest:
        value = _replace_field(getattr(settings, name), rest, value, method_key)
    return dataclasses.replace(settings, **{name: value})


def settings_with(overrides: dict[str, Any]) -> FinetuneSettings:
    """The product's default :class:`FinetuneSettings` with ``overrides`` applied."""
    settings = FinetuneSettings()
    for key, value in overrides.items():
        try:
            settings = _replace_field(settings, key, value, key)
        except Exception as error:  # wrong type, or the settings' own checks (FewLabelError)
            raise SystemExit(f"FinetuneSettings {key}={value!r} is refused: {error}") from error
    return settings


def train_and_predict_ours(
    case: Case,
    partial: np.ndarray,
    overrides: dict[str, Any],
    steps: int,
    seed: int,
    random_init: bool,
    max_side: int,
    workdir: Path,
    device: str = "cpu",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fine-tune our engine on ``partial`` and predict along the model card's axis."""
    job = FinetuneJob(
        image=case.image,
        labels=partial,
        out=workdir / f"{case.name}-ours-seed{seed}.safetensors",
        classes=named_classes(case.class_names),
        model=RANDOM_INIT if random_init else None,
        axis=0,
        steps=steps,
        seed=seed,
        device=device,
        max_input_side=max_side,
        settings=settings_with(overrides),
    )
    done, pred = run_and_predict(job, case.name)
    summary = {k: done.summary[k] for k in ("train_seconds", "val_dice") if k in done.summary}
    return pred, summary


def run_and_predict(job: FinetuneJob, name: str) -> tuple[Done, np.ndarray]:
    """Run a fine-tuning job to its end, then predict its scan with the model it wrote."""
    done = None
    for event in run(job):
        if isinstance(event, Done):
            done = event
    if done is None or done.checkpoint is None:
        raise RuntimeError(f"fine-tuning on {name} ended without a checkpoint")
    model = load_checkpoint(done.checkpoint)
    return done, predict_volume(model, job.image, device=job.device)


def run_method(
    case: Case,
    method: str,
    k: int | None,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train (if needed) and predict one method on one case; the result row (without the key)."""
    name, overrides = parse_method(method)
    if name == "upper":
        holds_structure = case.truth.any(axis=(1, 2))
        labelled = [z for z in range(0, case.truth.shape[0], 2) if holds_structure[z]]
        partial = np.zeros_like(case.truth)
        partial[labelled] = case.truth[labelled]
    else:
        assert k is not None
        partial, labelled = partial_labels(case.truth, k)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if name == "interp":
        pred, seconds = interpolate_contours_apart(partial, args.threads)
        start = time.perf_counter() - seconds  # wall_s: the filter alone
    elif name == "rf":
        pred = random_forest(case, partial, labelled, seed, args.threads)
    elif name in ("monai", "upper"):
        model, summary = train_monai(
            case.image, partial, args.steps, seed, case.class_names, device=args.device
        )
        pred = predict_volume(model, case.image, axis=0, device=args.device)
        extra["train_seconds"] = summary["train_seconds"]
    else:
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            pred, extra = train_and_predict_ours(
                case,
                partial,
                overrides,
                args.steps,
                seed,
                args.random_init,
                args.max_side,
                Path(workdir),
                args.device,
            )
        extra["settings"] = {k: _jsonable(v) for k, v in overrides.items()}
    wall = time.perf_counter() - start
    return {
        "labelled_slices": labelled,
        **score(pred, case.truth, labelled, case.class_names),
        "wall_s": round(wall, 1),
        **extra,
    }


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------- runs
def planned_runs(args: argparse.Namespace) -> list[tuple[str, int | None, int]]:
    """(method, k, seed) for every row this invocation asks for, per case."""
    plan: list[tuple[str, int | None, int]] = []
    for method in args.methods:
        name, _ = parse_method(method)
        seeds = args.peer_seeds if name in DETERMINISTIC_PEERS else args.seeds
        ks: list[int | None] = [None] if name == "upper" else list(args.k)
        plan += [(method, k, seed) for seed in seeds for k in ks]
    return plan


def row_key(case: str, method: str, k: int | None, seed: int, args: argparse.Namespace) -> dict:
    name, _ = parse_method(method)
    return {
        "case": case,
        "method": method,
        "init": ("random" if args.random_init else "default") if name == "ours" else None,
        "k": k,
        "seed": seed,
        "steps": None if name in DETERMINISTIC_PEERS else args.steps,
        "max_side": args.max_side,
    }


def run_suite(args: argparse.Namespace) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    done = read_rows(args.results)
    done_keys = {tuple(r.get(f) for f in ROW_KEY) for r in done}
    plan = planned_runs(args)
    for case_name in args.cases:
        todo = [
            (method, k, seed)
            for method, k, seed in plan
            if tuple(row_key(case_name, method, k, seed, args).values()) not in done_keys
        ]
        if not todo:
            continue
        case = load_case(case_name, args.max_side, args.case_cache)
        print(json.dumps(describe(case)), file=sys.stderr, flush=True)
        for method, k, seed in todo:
            key = row_key(case_name, method, k, seed, args)
            result = run_method(case, method, k, seed, args)
            row = {
                **key,
                **result,
                "shape": list(case.image.shape),
                "spacing_mm": [round(s, 4) for s in case.image.spacing_mm],
                "cpu": cpu_model(),
                "torch_threads": torch.get_num_threads(),
                "device": describe_device(resolve_device(args.device)),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
            }
            _append(args.results, row)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------- table
def _column(row: dict[str, Any]) -> str:
    return row["method"] + ("/random" if row.get("init") == "random" else "")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{sd} ({len(values)})"


def table(args: argparse.Namespace) -> str:
    """Markdown: mean Dice per case x k and method, means over cases, ratios to ``upper``."""
    rows = read_rows(args.results)
    if args.peers_from is not None:
        rows += [r for r in read_rows(args.peers_from) if r["method"] in DETERMINISTIC_PEERS]
    rows = [
        r
        for r in rows
        if r.get("max_side") == args.max_side and r.get("steps") in (None, args.steps)
    ]
    if not rows:
        return f"no rows for max_side={args.max_side}, steps={args.steps} in {args.results}"
    scores: dict[tuple[str, int | None, str], list[float]] = defaultdict(list)
    for r in rows:
        scores[(r["case"], r["k"], _column(r))].append(r["mean_dice"])
    columns = sorted({c for _, _, c in scores if c != "upper"}, key=_column_order)
    cases = [c for c in CASE_LOADERS if any(key[0] == c for key in scores)]
    ks = sorted({k for _, k, _ in scores if k is not None})

    def mean(case: str, k: int | None, column: str) -> float | None:
        values = scores.get((case, k, column))
        return statistics.mean(values) if values else None

    lines = [
        f"Mean Dice on unlabelled slices holding structure (mean ± sd (n) over seeds); "
        f"steps={args.steps}, max_side={args.max_side}",
        "",
        "| case | k | " + " | ".join(columns) + " | best peer | ours − best peer | upper |",
        "|---|---|" + "---|" * (len(columns) + 3),
    ]
    for case in cases:
        upper = _mean_sd(scores.get((case, None, "upper"), []))
        for k in ks:
            cells = [_mean_sd(scores.get((case, k, c), [])) for c in columns]
            peers = {p: mean(case, k, p) for p in PEERS}
            peers = {p: v for p, v in peers.items() if v is not None}
            best = max(peers, key=lambda p: peers[p]) if peers else ""
            ours = mean(case, k, "ours")
            margin = f"{ours - peers[best]:+.3f}" if best and ours is not None else ""
            lines.append(
                f"| {case} | {k} | " + " | ".join(cells) + f" | {best} | {margin} | {upper} |"
            )
    for k in ks:
        cells = []
        for c in columns:
            values = [v for v in (mean(case, k, c) for case in cases) if v is not None]
            cells.append(f"{statistics.mean(values):.3f} ({len(values)})" if values else "")
        lines.append(f"| **mean over cases** | {k} | " + " | ".join(cells) + " | | | |")
    lines += [
        "",
        f"Ratio to `upper` per case (k = {', '.join(map(str, ks))}, separated by /)",
        "",
        "| case | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for case in cases:
        upper_value = mean(case, None, "upper")
        if not upper_value:
            continue
        cells = []
        for c in columns:
            ratios = [mean(case, k, c) for k in ks]
            cells.append("/".join("–" if r is None else f"{r / upper_value:.2f}" for r in ratios))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_order(column: str) -> tuple[int, str]:
    base = column.split("[")[0].split("/")[0]
    return (PLAIN_METHODS.index(base) if base in PLAIN_METHODS else len(PLAIN_METHODS), column)


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASE_LOADERS), choices=CASE_LOADERS)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["interp", "rf", "monai", "upper", "ours"],
        help="interp, rf, monai, upper, ours, ours[key=value,...] (FinetuneSettings fields)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--peer-seeds", type=int, nargs="+", default=[0], help="seeds of rf and interp"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch / ITK / forest threads")
    parser.add_argument("--max-side", type=int, default=128, help="in-plane size cap (voxels)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="start ours from a random network instead of the product's default encoder",
    )
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results/fewslice_suite.jsonl"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fewslice")
    parser.add_argument(
        "--device", default="cpu", help="where ours, monai and upper train and predict (cpu, cuda)"
    )
    parser.add_argument(
        "--case-cache",
        type=Path,
        help="folder of prepared cases (<case>-<max_side>.npz): read when there, written when not",
    )
    parser.add_argument("--table", action="store_true", help="print the Markdown summary only")
    parser.add_argument(
        "--peers-from",
        type=Path,
        help="with --table: also take the interp and rf rows of this results file "
        "(deterministic peers run once on a CPU, beside network rows made on a GPU)",
    )
    args = parser.parse_args()
    if any(k < 1 for k in args.k):
        parser.error("--k values must be at least 1")
    if args.table:
        print(table(args))
        return
    for method in args.methods:
        parse_method(method)  # unknown methods and settings fail before any work
    run_suite(args)


if __name__ == "__main__":
    main()
