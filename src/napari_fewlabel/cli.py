"""The ``fewlabel`` command.

Subcommands (each in its own ``_cmd_*`` function, registered in :func:`main`):

* ``fewlabel demo [--headless]`` -- the whole loop on the synthetic cardiac phantom.
* ``fewlabel info SCAN`` -- shape, spacing, orientation, intensity range, modality.
* ``fewlabel finetune IMAGE LABELS --out model.safetensors`` -- fine-tune on a
  few labelled slices, with a progress bar.
* ``fewlabel pretrain DATA... --method ideal|medmoco|drasclr --out encoder.safetensors`` --
  self-supervised pretraining of the encoder on unlabelled scans (also under
  ``torchrun --nproc_per_node=N``); drasclr: the 3D encoder for emphysema subtypes.
* ``fewlabel adapt SOURCE_MODEL --target CT... --source MRI... --out adapted.safetensors`` --
  adapt an MRI model to CT without CT labels (Dou et al. 2018).
* ``fewlabel predict MODEL IMAGE --out mask.nii.gz`` -- segment a whole volume;
  ``fewlabel predict MODEL SCAN... --out-dir DIR`` -- a cohort: one mask per scan and
  a summary table, resumable, also under ``torchrun --nproc_per_node=N``.
* ``fewlabel suggest MODEL IMAGE [--labels LABELS] [--n 5]`` -- the unlabelled
  slices to label next (where the two streams disagree most).
* ``fewlabel emphysema CT --out DIR [--subtype-labels LABELS]`` -- lung masks and
  %LAA-950 of a chest CT; with a few labelled regions, a dense emphysema subtype map.
* ``fewlabel evaluate PRED TRUTH`` -- Dice, HD95 and ASD per class (table + JSON).

A :class:`~napari_fewlabel.errors.FewLabelError` prints its message on stderr
and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from nibabel.orientations import aff2axcodes

from napari_fewlabel import __version__
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import (
    MaskInfo,
    load_volume,
    looks_like_mask,
    read_mask_info,
    read_scan_header,
    save_labels,
)

EXIT_USER_ERROR = 2
#: What `predict` may write a mask as (.dcm: a DICOM SEG of a DICOM series).
_MASK_SUFFIXES = (".nii.gz", ".nii")
_SEG_SUFFIXES = (".dcm",)
_MODEL_SUFFIXES = (".safetensors",)
#: Free space a trained model needs beside its --out (the default networks write 2-10 MB,
#: and pretraining a resume state beside it): refused before training, not after.
_MODEL_NEED_BYTES = 32_000_000


# Each command checks its paths first, before it imports torch (seconds) or reads a scan
# (minutes): a typo is reported at once, not after the work it would have wasted.
def _check_inputs_exist(*paths: Path | str | None) -> None:
    """Refuse an input path that names nothing (the readers say the same, but later)."""
    for path in paths:
        if path is not None and not Path(path).expanduser().exists():
            raise FewLabelError(f"No file or folder at {path}: check the path.")


def _check_model(name_or_path: str | Path | None) -> None:
    """Refuse a --model (name or path) that names no model; `random` and None pass."""
    from napari_fewlabel.models.registry import resolve_model  # no torch

    if name_or_path is not None and str(name_or_path) != "random":
        resolve_model(name_or_path)


# ---------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="shape, spacing, orientation, intensity range and modality of a scan",
        description="Print what napari-fewlabel reads from a scan: NIfTI, NRRD, MetaImage, "
        "InVesalius, or a DICOM series folder. The voxels (intensity range, mask check) are "
        "read only when they take at most 1 GB of memory; a larger scan is described from "
        "its header.",
    )
    p.add_argument("path", help="a scan file or a DICOM series folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_info)


#: `info` reads the voxels (intensity range, modality guess, mask check) only up to this
#: much memory; a larger scan is described from its header alone, in a fraction of a second.
_INFO_READ_BYTES = 10**9


def _cmd_info(args: argparse.Namespace) -> int:
    header = read_scan_header(args.path)  # refuses what the header shows is unreadable
    shape, display_affine = header.display_geometry()
    volume = load_volume(args.path) if header.read_bytes <= _INFO_READ_BYTES else None
    intensity_range = None
    if volume is not None:
        data = volume.array
        finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
        if finite.size:
            intensity_range = [float(finite.min()), float(finite.max())]
    info: dict[str, object] = {
        "path": str(args.path),
        "format": header.format,
        "shape_zyx": list(shape),
        "spacing_mm_zyx": [round(s, 4) for s in header.spacing_mm],
        "file_orientation": "".join(aff2axcodes(header.affine)),
        "display_orientation": "".join(aff2axcodes(display_affine)),
        "modality": volume.modality if volume is not None else header.modality or "unknown",
        "dtype": str(volume.array.dtype) if volume is not None else header.dtype,
        "intensity_range": intensity_range,
        "affine_ras": [[round(v, 4) for v in row] for row in display_affine.tolist()],
    }
    if volume is None:
        info["voxels"] = (
            f"not read ({header.read_bytes / 1e9:.1f} GB to load; info reads up to "
            f"{_INFO_READ_BYTES / 1e9:.0f} GB): header only"
        )
    for key in ("SeriesDescription", "other_series", "files", "qform_code", "sform_code"):
        if key in header.details:
            info[key] = header.details[key]
    if volume is not None and looks_like_mask(volume, args.path):
        saved = read_mask_info(args.path) or MaskInfo()
        info["mask"] = True
        if saved.classes:
            info["classes"] = [f"{c['index']} {c['name']}" for c in saved.classes]
        if saved.empty_slices:
            info["marked_empty"] = {"axis": saved.empty_axis, "slices": list(saved.empty_slices)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "affine_ras":
            continue
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole loop on the synthetic cardiac MRI with two labelled slices",
        description="Open napari with the Fine-tune and segment widget and the cardiac MRI "
        "phantom (two slices already labelled: press Start). With --headless, run the same "
        "loop without a window and write the scan, annotation, model, prediction and a "
        "report scored against the phantom's truth into --out.",
    )
    p.add_argument("--headless", action="store_true", help="no window: run the loop, write files")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (headless)")
    p.add_argument("--steps", type=int, help="training steps (default: the engine's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--screenshot",
        type=Path,
        metavar="PNG",
        help="(GUI) press Start, wait for the prediction, save a screenshot, quit",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_fewlabel.io.atomic import check_output_file, check_output_folder

    if args.screenshot is not None:
        check_output_file(args.screenshot, (".png",), option="--screenshot")
    if args.headless:
        check_output_folder(args.out)
    if not args.headless:
        from napari_fewlabel.napari._demo import run_demo

        return run_demo(steps=args.steps, screenshot=args.screenshot)
    from napari_fewlabel.demo import describe, run_headless

    def show(event: Any) -> None:
        line = describe(event)
        if line:
            print(line, flush=True)

    report = run_headless(args.out, steps=args.steps, device=args.device, on_event=show)
    print(
        f"Mean Dice on the {len(report['classes'])} classes over the unlabelled slices: "
        f"{report['mean_dice_unlabelled_slices']:.3f} ({report['seconds']:.0f} s on "
        f"{report['device']})."
    )
    print(f"Wrote {', '.join(report['outputs'].values())} and report.json to {args.out}/")
    return 0


# ----------------------------------------------------------------- emphysema
def _add_emphysema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emphysema",
        help="lung masks and emphysema scores (%%LAA-950, %%LAA-910, Perc15) of a chest CT",
        description="Segment the right and left lung of a chest CT in Hounsfield units and "
        "score emphysema: %%LAA (share of lung voxels below the threshold) for both lungs, "
        "each lung and the upper/middle/lower thirds, %%LAA-910 and Perc15. Writes "
        "lungs.nii.gz (1 right, 2 left), low_attenuation.nii.gz, emphysema.csv and "
        "emphysema.json to the --out folder.",
    )
    p.add_argument("ct", help="a chest CT file or DICOM series folder, in Hounsfield units")
    p.add_argument("--out", required=True, help="folder for the masks and scores")
    p.add_argument(
        "--threshold",
        type=float,
        default=-950.0,
        metavar="HU",
        help="low-attenuation threshold in HU (default -950)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    subtypes = p.add_argument_group(
        "emphysema subtypes",
        "Map centrilobular, paraseptal and panlobular emphysema over the lungs from a few "
        "regions you labelled on this CT (DrasCLR patch classifier): writes subtypes.nii.gz "
        "(0 not lung, 1 normal lung, 2 centrilobular, 3 paraseptal, 4 panlobular), "
        "subtype_model.safetensors, and the share of each subtype per region in the CSV/JSON.",
    )
    source = subtypes.add_mutually_exclusive_group()
    source.add_argument(
        "--subtype-labels",
        type=Path,
        metavar="LABELS",
        help="label map on the CT's grid: 0 unlabelled, 1 normal lung, 2 centrilobular, "
        "3 paraseptal, 4 panlobular (a few painted regions of at least two subtypes)",
    )
    source.add_argument(
        "--subtype-model",
        metavar="MODEL",
        help="map subtypes with a model trained before (its subtype_model.safetensors)",
    )
    subtypes.add_argument(
        "--extra-subtype-labels",
        nargs=2,
        action="append",
        type=Path,
        default=[],
        metavar=("CT", "LABELS"),
        help="another CT and its labelled regions to learn from as well (repeatable); the map "
        "is made for the first CT",
    )
    subtypes.add_argument(
        "--encoder",
        metavar="ENCODER",
        help="start the classifier from this DrasCLR encoder (`fewlabel pretrain --method "
        "drasclr`; default: a random encoder)",
    )
    subtypes.add_argument(
        "--subtype-steps", type=int, default=600, metavar="STEPS", help="training steps (600)"
    )
    subtypes.add_argument(
        "--stride",
        type=int,
        metavar="VOXELS",
        help="patch voxels between classified patches (default: a quarter of the patch side)",
    )
    subtypes.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_cmd_emphysema)


def _cmd_emphysema(args: argparse.Namespace) -> int:
    from napari_fewlabel.io.atomic import atomic_path, check_output_folder

    out = check_output_folder(args.out)
    _check_inputs_exist(
        args.ct, args.subtype_labels, *(p for pair in args.extra_subtype_labels for p in pair)
    )
    _check_model(args.subtype_model)
    _check_model(args.encoder)

    from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES
    from napari_fewlabel.infer.emphysema import (
        REGIONS,
        low_attenuation_classes,
        quantify_emphysema,
    )
    from napari_fewlabel.infer.lungs import LUNG_CLASSES

    if (args.encoder or args.extra_subtype_labels) and not args.subtype_labels:
        raise FewLabelError(
            "--encoder and --extra-subtype-labels go with subtype training: give "
            "--subtype-labels too."
        )
    scan = load_volume(args.ct)
    subtype_labels = None
    extra_labelled: list[tuple[Any, Any]] = []
    if args.subtype_labels:
        from napari_fewlabel.train.subtypes import check_subtype_labels, labelled_subtypes

        subtype_labels = load_volume(args.subtype_labels)
        arrays = [check_subtype_labels(scan, subtype_labels, args.subtype_labels.name)]
        for extra_ct, extra_labels in args.extra_subtype_labels:
            pair = (load_volume(extra_ct), load_volume(extra_labels))
            arrays.append(check_subtype_labels(*pair, extra_labels.name))
            extra_labelled.append(pair)
        labelled_subtypes(arrays)
    # Everything is computed before the first file is written: a scan that cannot be
    # scored leaves the output folder untouched.
    report = quantify_emphysema(scan, threshold_hu=args.threshold)
    with tempfile.TemporaryDirectory(prefix="fewlabel-subtypes-") as scratch:
        subtype_map, model_file = None, None
        if subtype_labels is not None or args.subtype_model:
            subtype_map, model_file = _map_subtypes(
                args, scan, subtype_labels, extra_labelled, report, scratch
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FewLabelError(
                f"Cannot create {out} ({exc.strerror}): choose a folder you can write to."
            ) from exc
        laa_info = MaskInfo.of_classes(low_attenuation_classes(report.threshold_hu))
        written = [
            save_labels(
                report.lungs.labels,
                like=scan,
                path=out / "lungs.nii.gz",
                info=MaskInfo.of_classes(LUNG_CLASSES),
            ),
            save_labels(
                report.low_attenuation,
                like=scan,
                path=out / "low_attenuation.nii.gz",
                info=laa_info,
            ),
        ]
        if subtype_map is not None:
            subtypes_info = MaskInfo.of_classes(EMPHYSEMA_SUBTYPES)
            written.append(
                save_labels(
                    subtype_map.labels, like=scan, path=out / "subtypes.nii.gz", info=subtypes_info
                )
            )
        if model_file is not None:
            with atomic_path(out / "subtype_model.safetensors") as tmp:
                shutil.copyfile(model_file, tmp)
            written.append(out / "subtype_model.safetensors")
    rows = report.to_table()
    extra: dict[str, Any] = {"scan": str(args.ct)}
    by_region: dict[str, dict[str, float | None]] = {}
    if subtype_map is not None:
        by_region = {name: subtype_map.percent(report.region_mask(name)) for name in REGIONS}
        extra["subtypes"] = {
            **subtype_map.to_dict(),
            "labels": str(args.subtype_labels) if args.subtype_labels else None,
            "model": str(args.subtype_model or out / "subtype_model.safetensors"),
            "by_region": by_region,
        }
    columns = {
        region: {f"{name.replace(' ', '_')}_percent": v for name, v in shares.items()}
        for region, shares in by_region.items()
    }
    written.append(report.write_csv(out / "emphysema.csv", extra_columns=columns))
    written.append(report.write_json(out / "emphysema.json", **extra))
    document = {**extra, **report.to_dict()}

    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    threshold = f"%LAA{report.threshold_hu:g}"
    print(f"{'region':<13} {'volume mL':>10} {threshold:>9} {'%LAA-910':>9} {'Perc15 HU':>10}")
    for row in rows:
        print(
            f"{row['region']:<13} {_cell(row['lung_volume_ml'], 10, 1)} "
            f"{_cell(row['laa_percent'], 9, 2)} {_cell(row['laa_910_percent'], 9, 2)} "
            f"{_cell(row['perc15_hu'], 10, 0)}"
        )
    if subtype_map is not None:
        shares = subtype_map.percent()
        print(
            "subtypes (% of lung): "
            + ", ".join(f"{name} {_cell(v, 0, 1).strip()}" for name, v in shares.items())
        )
    if report.lungs.lungs_were_split:
        print("note: the lungs touched and were separated where they are thinnest")
    if not report.lungs.airway.any():
        print("note: no trachea found in the field of view")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _map_subtypes(
    args: argparse.Namespace,
    scan: Any,
    labels: Any,
    extra_labelled: list[tuple[Any, Any]],
    report: Any,
    scratch: str,
) -> tuple[Any, Path | None]:
    """Train a subtype model on ``labels`` and ``extra_labelled`` (or load ``--subtype-model``)
    and map the lungs of ``scan``."""
    from napari_fewlabel.infer.lungs import segment_lungs
    from napari_fewlabel.infer.subtypes import load_subtype_model, map_subtypes
    from napari_fewlabel.models.registry import resolve_model
    from napari_fewlabel.train.subtypes import SubtypeJob, run

    model_file: Path | None = None
    if labels is not None:
        if args.subtype_steps < 1:
            raise FewLabelError(f"--subtype-steps must be at least 1, got {args.subtype_steps}.")
        job = SubtypeJob(
            scans=(scan, *(ct for ct, _ in extra_labelled)),
            labels=(labels, *(lab for _, lab in extra_labelled)),
            out=Path(scratch) / "subtype_model.safetensors",
            encoder=args.encoder,
            lungs=(report.lungs, *(segment_lungs(ct) for ct, _ in extra_labelled)),
            steps=args.subtype_steps,
            device=args.device,
        )
        done = _show_progress(run(job))
        model_file = done.checkpoint
        model = load_subtype_model(model_file)
    else:
        model = load_subtype_model(resolve_model(args.subtype_model))
    if args.stride is not None and args.stride < 1:
        raise FewLabelError(f"--stride must be at least 1, got {args.stride}.")
    subtype_map = map_subtypes(model, scan, report.lungs, stride=args.stride, device=args.device)
    return subtype_map, model_file


def _cell(value: object, width: int, digits: int) -> str:
    """A right-aligned number for the table, or '-' for a region without lung."""
    if not isinstance(value, int | float):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


# ------------------------------------------------------------------ finetune
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a few labelled slices",
        description="Fine-tune a two-stream U-Net on the labelled slices of LABELS "
        "(slices with any nonzero voxel; 0 there is background) and the unlabelled rest "
        "of IMAGE.",
    )
    p.add_argument(
        "image", type=Path, help="the scan (NIfTI, NRRD, MetaImage, InVesalius or a DICOM folder)"
    )
    p.add_argument("labels", type=Path, help="label map on the same grid (NIfTI)")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument(
        "--model",
        help="start from this model (name or path), or 'random'; default: the shipped "
        "pretrained encoder when it suits the scan, else random (`fewlabel models` lists them)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after this long")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), help="slice axis (default: inferred)")
    p.add_argument(
        "--empty-slices",
        type=int,
        nargs="+",
        default=[],
        metavar="INDEX",
        help="slices you checked and found without any of the structures: trained on as "
        "background, which removes false positives there. 0-based along the slice axis, "
        "numbered as napari shows the scan (axial 0 is the most inferior slice; the file's "
        "own order may differ, see `fewlabel info`)",
    )
    p.add_argument("--classes", help="comma-separated class names, background first")
    p.add_argument("--extra-unlabelled", type=Path, nargs="*", default=[], metavar="IMAGE")
    p.add_argument(
        "--extra-labelled",
        type=Path,
        nargs=2,
        action="append",
        default=[],
        metavar=("IMAGE", "LABELS"),
        help="another labelled scan of the same kind (repeat for more), e.g. to train an MRI "
        "source model for `fewlabel adapt` on several volumes",
    )
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue an earlier run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-side", type=int, default=256)
    p.add_argument(
        "--method",
        choices=("default", "paper", "supervised"),
        default="default",
        help="default: measured best; paper: IDEAL as published; supervised: labels only",
    )
    p.add_argument(
        "--planes",
        choices=("auto", "all", "labelled"),
        help="all: also train on the coronal/sagittal slices across the labelled ones (their "
        "labelled lines) and average three planes at prediction; labelled: the labelled "
        "plane only; auto: all unless one of several painted structures is small (default: the method's; "
        "docs/engine.md)",
    )
    p.add_argument(
        "--every-step",
        action="store_true",
        help="do every step even when the run has converged (by default, once the streams' "
        "agreement and the labelled loss have plateaued the rest of the schedule runs twice "
        "as fast)",
    )
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from napari_fewlabel.io.atomic import check_output_file

    check_output_file(args.out, _MODEL_SUFFIXES, need_bytes=_MODEL_NEED_BYTES)
    _check_inputs_exist(
        args.image,
        args.labels,
        *args.extra_unlabelled,
        *(p for pair in args.extra_labelled for p in pair),
    )
    _check_model(args.model)
    _check_model(args.resume)

    from napari_fewlabel.data.classes import SegmentationClass, named_classes
    from napari_fewlabel.train.finetune import DEFAULT_STEPS, FinetuneJob, FinetuneSettings, run

    settings = {
        "default": FinetuneSettings(),
        "paper": FinetuneSettings.paper(),
        "supervised": FinetuneSettings.supervised(),
    }[args.method]
    if args.planes is not None:
        settings = replace(settings, planes=args.planes)
    if args.every_step:
        settings = replace(settings, stop_when_converged=None)
    image = load_volume(args.image)
    labels = load_volume(args.labels)
    extra = tuple(load_volume(p) for p in args.extra_unlabelled)
    extra_labelled = tuple((load_volume(i), load_volume(lab)) for i, lab in args.extra_labelled)
    classes = None
    if args.classes:
        classes = named_classes([n.strip() for n in args.classes.split(",")])
    axis, empty_slices = args.axis, tuple(args.empty_slices)
    saved = read_mask_info(args.labels)  # an annotation saved from napari keeps these
    if saved is not None:
        if classes is None and saved.classes:
            classes = tuple(SegmentationClass.from_dict(c) for c in saved.classes)
        if not empty_slices and saved.empty_slices:
            if axis is not None and axis != saved.empty_axis:
                raise FewLabelError(
                    f"{args.labels.name} marks slices along axis {saved.empty_axis} empty but "
                    f"--axis is {axis}: leave out --axis, or give --empty-slices for axis {axis}."
                )
            axis, empty_slices = saved.empty_axis, saved.empty_slices
            print(
                f"Slices marked empty in {args.labels.name} (axis {axis}): "
                + ", ".join(map(str, empty_slices))
                + " (give --empty-slices to use others)",
                file=sys.stderr,
            )
    job = FinetuneJob(
        image=image,
        labels=labels,
        out=args.out,
        classes=classes,
        model=args.model,
        resume_from=args.resume,
        axis=axis,
        empty_slices=empty_slices,
        steps=args.steps or DEFAULT_STEPS,
        time_budget_s=args.time_budget,
        device=args.device,
        seed=args.seed,
        settings=settings,
        max_input_side=args.max_input_side,
        extra_unlabelled=extra,
        extra_labelled=extra_labelled,
    )
    done = _show_progress(run(job))
    s = done.summary
    val = s.get("val_dice")
    print(
        f"Wrote {done.checkpoint} after {s['steps_done']} steps in {s['train_seconds']:.0f} s"
        + (f"; validation Dice {val:.3f}" if val is not None else "")
        + "."
    )
    return 0


def _show_progress(events: Iterator[Any]) -> Any:
    """Drive a job's events: a progress bar, notices as lines; returns the final Done (or None)."""
    from napari_fewlabel.train.events import Done, Notice, Progress

    bar = _ProgressBar(sys.stderr)
    done = None
    for event in events:
        if isinstance(event, Progress):
            bar.update(event)
        elif isinstance(event, Notice):
            bar.message(("warning: " if event.level == "warning" else "") + event.message)
        elif isinstance(event, Done):
            bar.finish()
            done = event
    return done  # None only where a job yields nothing (pretraining ranks other than 0)


class _ProgressBar:
    """A one-line progress bar on a terminal; a line every 10 % otherwise (logs)."""

    def __init__(self, stream: TextIO, width: int = 28) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.last_decile = -1
        self.open_line = False
        self.started = time.monotonic()

    def update(self, event: Any) -> None:
        frac = event.step / max(1, event.total)
        if event.eta_s is not None:  # a time budget can end a run long before its steps
            elapsed = time.monotonic() - self.started
            frac = max(frac, elapsed / max(1e-9, elapsed + event.eta_s))
        parts = [self._bar(frac, event.step, event.total)]
        if "wasserstein" in event.losses:  # adaptation: the critic's estimate and the DAM loss
            parts.append(f"Wasserstein {event.losses['wasserstein']:.3f}")
            if "dam" in event.losses:
                parts.append(f"DAM loss {event.losses['dam']:.3f}")
            elif event.extra.get("warmup"):
                parts.append("critic warm-up")
        else:
            parts.append(f"loss {event.losses.get('total', float('nan')):.3f}")
        if event.val_dice is not None:
            parts.append(f"val Dice {event.val_dice:.3f}")
        if "effective_rank" in event.extra:
            parts.append(f"effective rank {event.extra['effective_rank']:.1f}")
        if event.note:
            parts.append(event.note)
        if event.eta_s is not None:
            parts.append(f"ETA {_duration(event.eta_s)}")
        parts.append(event.device)
        self._draw(frac, "  ".join(parts))

    def count(self, step: int, total: int, text: str) -> None:
        """``[####....] step/total  text``: progress over items (scans)."""
        frac = step / max(1, total)
        self._draw(frac, f"{self._bar(frac, step, total)}  {text}")

    def _bar(self, frac: float, step: int, total: int) -> str:
        filled = round(self.width * frac)
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total}"

    def _draw(self, frac: float, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.open_line = True
        elif int(10 * frac) > self.last_decile:
            self.last_decile = int(10 * frac)
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------ pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining of the encoder on unlabelled scans",
        description="Pretrain the fine-tuning network's encoder on unlabelled scans with IDEAL "
        "dense contrastive learning or med-moco (MoCo v2 + local contrast + feature "
        "decorrelation), or the 3D DrasCLR encoder for emphysema subtypes on chest CTs "
        "(--method drasclr: location-conditioned patches from the lungs). Scans are read lazily "
        "and slices or patches sampled on the fly. Writes the encoder to --out (start "
        "fine-tuning from it with `fewlabel finetune --model`, or subtype mapping with "
        "`fewlabel emphysema --encoder`) and the training state next to it "
        "(<name>.state.safetensors, for --resume). Runs on several processes under "
        "`torchrun --nproc_per_node=N -m napari_fewlabel.cli pretrain ...`.",
    )
    p.add_argument(
        "data", nargs="+", type=Path, help="scan files or folders (NIfTI, NRRD, MHA, DICOM, .inv3)"
    )
    p.add_argument(
        "--method",
        choices=("ideal", "medmoco", "drasclr"),
        default="ideal",
        help="ideal or medmoco: the 2D fine-tuning encoder; drasclr: the 3D location-"
        "conditioned encoder for emphysema subtypes, on chest CT (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="encoder file to write (.safetensors)")
    p.add_argument(
        "--steps", type=int, help="training steps (default: about 30 minutes on 2 CPU cores)"
    )
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop after this long")
    p.add_argument("--batch-size", type=int, help="slices per step and process")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue an earlier run")
    p.add_argument(
        "--init",
        metavar="ENCODER",
        help="(ideal, medmoco) start from this encoder's weights, a file or a registry name such "
        "as ideal-encoder, with fresh heads: continued pretraining on DATA",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, help="InfoNCE temperature")
    p.add_argument("--momentum", type=float, help="momentum of the key encoder")
    p.add_argument(
        "--queue-size",
        type=int,
        help="MoCo queue length (default: sized to the data; drasclr: keys per location bin, 64)",
    )
    p.add_argument("--decorrelation", type=float, metavar="WEIGHT", help="decorrelation weight")
    p.add_argument("--view-size", type=int, help="side of the augmented views in pixels")
    p.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="range of each view's crop side as a fraction of the slice's shorter side, "
        "0 < LOW <= HIGH <= 1 (default 0.4 1: from 40%% of the slice to all of it)",
    )
    p.add_argument("--slice-size", type=int, default=256, help="side slices are fitted to")
    p.add_argument("--half", action="store_true", help="store the encoder in float16")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes")
    p.add_argument(
        "--patch-size", type=int, help="(drasclr) side of the 3D patches in voxels (default 32)"
    )
    p.add_argument(
        "--patch-spacing", type=float, metavar="MM", help="(drasclr) patch voxel size (default 1)"
    )
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_fewlabel.io.atomic import check_output_file

    check_output_file(args.out, _MODEL_SUFFIXES, need_bytes=_MODEL_NEED_BYTES)
    _check_inputs_exist(*args.data)  # --resume: the job finds the state file that goes with it
    if args.method != "drasclr":  # where --init is refused with its own sentence below
        _check_model(args.init)
    if args.method == "drasclr":
        if args.init is not None:
            raise FewLabelError("--init is for --method ideal or medmoco, not drasclr.")
        return _cmd_pretrain_drasclr(args)
    if args.patch_size is not None or args.patch_spacing is not None:
        raise FewLabelError("--patch-size and --patch-spacing are for --method drasclr.")

    from napari_fewlabel.train.pretrain import (
        DEFAULT_STEPS,
        PretrainJob,
        PretrainSettings,
        run,
        with_overrides,
    )

    settings = with_overrides(
        PretrainSettings.for_method(args.method),
        batch_size=args.batch_size,
        temperature=args.temperature,
        momentum=args.momentum,
        queue_size=args.queue_size,
        decorrelation_weight=args.decorrelation,
    )
    if args.view_size:
        settings = replace(
            settings, views=replace(settings.views, size=(args.view_size, args.view_size))
        )
    if args.crop_scale is not None:
        low, high = args.crop_scale
        if not 0 < low <= high <= 1:
            raise FewLabelError(
                f"--crop-scale {low:g} {high:g}: give two fractions of the slice with "
                "0 < LOW <= HIGH <= 1, e.g. --crop-scale 0.4 1."
            )
        settings = replace(settings, views=replace(settings.views, crop_scale=(low, high)))
    job = PretrainJob(
        data=tuple(args.data),
        out=args.out,
        settings=settings,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        time_budget_s=args.time_budget,
        device=args.device,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume_from=args.resume,
        init_from=args.init,
        slice_size=args.slice_size,
        half=args.half,
        num_workers=args.workers,
    )
    done = _show_progress(run(job))
    if done is None:  # under torchrun, only rank 0 reports
        return 0
    s = done.summary
    rank = s.get("effective_rank")
    print(
        f"Wrote {done.checkpoint} after {s['steps_done']} steps in "
        f"{s['train_seconds']:.0f} s ({s.get('slices_per_s', 0):.1f} slices/s"
        + (f", effective rank {rank:.1f}" if rank is not None else "")
        + f"); training state in {s['state']}."
    )
    return 0


def _cmd_pretrain_drasclr(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_fewlabel.models.drasclr import DrasCLRConfig
    from napari_fewlabel.train.pretrain_drasclr import (
        DEFAULT_STEPS,
        DrasCLRPretrainJob,
        DrasCLRSettings,
        run,
        with_overrides,
    )

    not_for_drasclr = {
        "--view-size": args.view_size,
        "--crop-scale": args.crop_scale,
        "--decorrelation": args.decorrelation,
        "--slice-size": None if args.slice_size == 256 else args.slice_size,
    }
    given = [name for name, value in not_for_drasclr.items() if value is not None]
    if given:
        raise FewLabelError(f"{', '.join(given)} do(es) not apply to --method drasclr: leave out.")
    settings = with_overrides(
        DrasCLRSettings(),
        batch_size=args.batch_size,
        temperature=args.temperature,
        momentum=args.momentum,
        queue_size=args.queue_size,
    )
    architecture = DrasCLRConfig()
    if args.patch_size is not None or args.patch_spacing is not None:
        architecture = replace(
            architecture,
            patch_size=args.patch_size or architecture.patch_size,
            patch_spacing_mm=args.patch_spacing or architecture.patch_spacing_mm,
        )
    job = DrasCLRPretrainJob(
        data=tuple(args.data),
        out=args.out,
        settings=settings,
        architecture=architecture,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        time_budget_s=args.time_budget,
        device=args.device,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume_from=args.resume,
        half=args.half,
    )
    done = _show_progress(run(job))
    if done is None:  # under torchrun, only rank 0 reports
        return 0
    s = done.summary
    print(
        f"Wrote {done.checkpoint} after {s['steps_done']} steps in {s['train_seconds']:.0f} s "
        f"({s.get('patches_per_s', 0):.1f} patches/s); training state in {s['state']}. Use it "
        f"with `fewlabel emphysema CT --out DIR --subtype-labels LABELS --encoder {done.checkpoint}`."
    )
    return 0


# --------------------------------------------------------------------- adapt
def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt an MRI segmentation model to CT without CT labels",
        description="Unsupervised MRI -> CT adaptation (Dou et al. 2018): a trainable copy of "
        "the source model's first encoder stages is trained against a Wasserstein domain critic "
        "on unlabelled CT, the other layers stay frozen. Writes an ordinary CT model to --out "
        "(use it with `fewlabel predict` or as --model of `fewlabel finetune`) and the training "
        "state next to it (<name>.state.safetensors, for --resume).",
    )
    p.add_argument("source_model", help="the MRI model (name or .safetensors path)")
    p.add_argument(
        "--target", nargs="+", type=Path, required=True, metavar="CT", help="CT scans (HU)"
    )
    p.add_argument(
        "--source",
        nargs="*",
        type=Path,
        default=[],
        metavar="MRI",
        help="MRI scans like the ones the model was trained on (no labels needed); default: "
        "the scan named in the model card",
    )
    p.add_argument("--out", type=Path, required=True, help="adapted model to write (.safetensors)")
    p.add_argument("--steps", type=int, help="joint updates, warm-up included (default: 300)")
    p.add_argument("--warmup", type=int, metavar="STEPS", help="critic-only steps at the start")
    p.add_argument(
        "--critic-updates",
        type=int,
        help="critic updates per DAM update (default: 20 with clip, as in the paper; 5 with gp)",
    )
    p.add_argument("--dam-stages", type=int, help="encoder stages to adapt (default: all)")
    p.add_argument(
        "--objective",
        choices=("clip", "gp"),
        default="clip",
        help="clip: WGAN with weight clipping (the paper's, default); gp: WGAN-GP with 5 critic "
        "updates per DAM update (better on the cardiac phantom, worse on the head pair: "
        "docs/adaptation.md)",
    )
    p.add_argument(
        "--target-normalization",
        choices=("ct_window", "percentile_zscore"),
        default="ct_window",
        help="CT intensities into the adapted model: HU window (default) or per-volume z-score",
    )
    p.add_argument(
        "--target-labels",
        type=Path,
        metavar="LABELS",
        help="a label map on the first --target scan's grid with a few painted slices (along the "
        "model's slice axis; all-zero slices are unlabelled): their Dice + cross-entropy joins "
        "every DAM update",
    )
    p.add_argument(
        "--critic-region",
        choices=("whole", "anatomy"),
        help="what the domain critic compares: whole slices (default) or only the region around "
        "the anatomy in each domain, so that field of view does not tell MRI from CT (implied by "
        "--source-labels or --target-box; without them the region is the source model's "
        "prediction, which measured worse than whole slices: docs/adaptation.md)",
    )
    p.add_argument(
        "--source-labels",
        type=Path,
        metavar="LABELS",
        help="labels on the first MRI scan's grid (e.g. the source model's training labels): the "
        "critic's MRI region is around them",
    )
    p.add_argument(
        "--target-box",
        metavar="Z0:Z1,Y0:Y1,X0:X1",
        help="the critic's region on the first CT scan in voxels as napari shows them (ends "
        "excluded), e.g. 10:60,40:200,30:220",
    )
    p.add_argument(
        "--check",
        metavar="NAME",
        help="the label-free check that picks the checkpoint to keep, the start included "
        "(default: stream_agreement; 'last' keeps the last one; the others and how they were "
        "measured: docs/adaptation.md)",
    )
    p.add_argument(
        "--check-every", type=int, metavar="STEPS", help="steps between checks (default: 25)"
    )
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue an earlier run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args: argparse.Namespace) -> int:
    from napari_fewlabel.io.atomic import check_output_file

    check_output_file(args.out, _MODEL_SUFFIXES, need_bytes=_MODEL_NEED_BYTES)
    _check_model(args.source_model)
    _check_inputs_exist(
        *args.target, *args.source, *filter(None, [args.target_labels, args.source_labels])
    )
    _check_model(args.resume)

    from napari_fewlabel.train.adapt import DEFAULT_STEPS, AdaptJob, AdaptSettings, run
    from napari_fewlabel.train.adapt_region import parse_box

    region_given = args.source_labels is not None or args.target_box is not None
    if args.critic_region == "whole" and region_given:
        raise FewLabelError(
            "--source-labels and --target-box set the critic's region: drop them or use "
            "--critic-region anatomy."
        )
    target_box = None if args.target_box is None else parse_box(args.target_box)

    if args.steps is not None and args.steps < 1:
        raise FewLabelError(f"--steps must be at least 1, got {args.steps}.")
    changes = {
        "warmup_steps": args.warmup,
        "critic_updates": args.critic_updates,
        "dam_stages": args.dam_stages,
        "check": args.check,
        "check_every": args.check_every,
        "critic_region": args.critic_region or ("anatomy" if region_given else None),
    }
    settings = AdaptSettings.for_objective(
        args.objective,
        target_normalization=args.target_normalization,
        **{k: v for k, v in changes.items() if v is not None},
    )
    target = tuple(_as_ct(load_volume(p)) for p in args.target)
    target_labels = None
    if args.target_labels is not None:
        target_labels = load_volume(args.target_labels)
        _check_adapt_label_names(args.target_labels, args.source_model)
    job = AdaptJob(
        source_model=args.source_model,
        target=target,
        target_labels=target_labels,
        source=tuple(load_volume(p) for p in args.source),
        source_labels=None if args.source_labels is None else load_volume(args.source_labels),
        target_box=target_box,
        out=args.out,
        resume_from=args.resume,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        device=args.device,
        seed=args.seed,
        settings=settings,
    )
    done = _show_progress(run(job))
    s = done.summary
    w = s["final_losses"].get("wasserstein")
    print(
        f"Wrote {done.checkpoint} after {s['steps_done']} steps in {s['train_seconds']:.0f} s"
        + (f"; Wasserstein estimate {w:.3f}" if w is not None else "")
        + f". Predict CT with it: `fewlabel predict {done.checkpoint} CT.nii.gz --out mask.nii.gz`."
    )
    if s.get("verdict"):
        print(f"Checkpoint kept: {s['verdict']}.")
    return 0


def _check_adapt_label_names(labels_path: Path, model: str) -> None:
    """Painted CT labels saved with class names must name the model's classes in its order."""
    from napari_fewlabel.models.card import read_card
    from napari_fewlabel.models.registry import resolve_model

    saved = read_mask_info(labels_path)
    if saved is None or not saved.classes:
        return
    names = [str(c.get("name", "")) for c in saved.classes]
    wanted = list(read_card(resolve_model(model)).class_names)
    if names[: len(wanted)] != wanted[: len(names)]:
        raise FewLabelError(
            f"{labels_path.name} names its classes {', '.join(names)}, but the model's are "
            f"{', '.join(wanted)}: paint the CT slices with the model's classes (index = class)."
        )


def _as_ct(volume: Any) -> Any:
    """A --target scan whose modality could not be told from the file is taken as CT."""
    return (
        volume.with_array(volume.array, modality="CT") if volume.modality == "unknown" else volume
    )


# ------------------------------------------------------------------- predict
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a whole volume, or many, with a model",
        description="Segment one scan (--out mask.nii.gz, or --out seg.dcm for a DICOM SEG "
        "of a DICOM series) or many (--out-dir DIR: one <name>_mask.nii.gz, or with --format "
        "seg one <name>_seg.dcm, per scan, summary.csv and summary.json; masks already there "
        "are skipped, so a stopped run resumes). Under `torchrun --nproc_per_node=N` the scans "
        "are shared among the N processes.",
    )
    p.add_argument("model", help="model name or .safetensors path")
    p.add_argument(
        "scans",
        nargs="+",
        type=Path,
        metavar="SCAN",
        help="scan files (NIfTI, NRRD, MetaImage, InVesalius), DICOM folders (a folder of "
        "several series gives a mask per series), or .txt files listing them one a line",
    )
    outs = p.add_mutually_exclusive_group()
    outs.add_argument(
        "--out", type=Path, help="mask to write for one scan (.nii.gz; .dcm: DICOM SEG)"
    )
    outs.add_argument(
        "--out-dir", type=Path, help="folder for the masks and the summary of many scans"
    )
    p.add_argument(
        "--format",
        choices=("nifti", "seg"),
        help="mask format: nifti (default) or seg, a DICOM SEG referencing the scan's DICOM "
        "series (DICOM scans only); with --out the suffix decides",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), help="slice axis (default: the model's)")
    p.add_argument(
        "--batch-size", type=int, help="slices per forward pass (default: 2 on CPU, 16 on GPU)"
    )
    flips = p.add_mutually_exclusive_group()
    flips.add_argument("--flips", dest="flips", action="store_true", default=None,
                       help="average over flipped copies (test-time augmentation)")  # fmt: skip
    flips.add_argument("--no-flips", dest="flips", action="store_false")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.out_dir is not None:
        return _predict_cohort(args)
    if len(args.scans) > 1:
        raise FewLabelError(
            f"{len(args.scans)} scans need --out-dir DIR (one mask each), not --out: e.g. "
            "--out-dir masks."
        )
    if args.out is None:
        raise FewLabelError(
            "Say where to write: --out mask.nii.gz for one scan, or --out-dir DIR for a mask "
            "per scan and a summary."
        )
    if args.scans[0].name.lower().endswith(".txt"):
        raise FewLabelError(
            f"{args.scans[0]} is a list of scans: give --out-dir DIR (one mask each), not --out."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FewLabelError(
            "Under torchrun give --out-dir DIR (the scans are shared among the processes); "
            "--out predicts one scan in one process."
        )
    return _predict_one(args, args.scans[0])


def _predict_one(args: argparse.Namespace, image_path: Path) -> int:
    from napari_fewlabel.io.atomic import check_output_file
    from napari_fewlabel.models.registry import resolve_model

    as_seg = args.out.name.lower().endswith(_SEG_SUFFIXES)
    if args.format is not None and (args.format == "seg") != as_seg:
        raise FewLabelError(
            f"--format {args.format} does not match --out {args.out.name}: a DICOM SEG is "
            "written to a .dcm file, a NIfTI mask to .nii.gz (or leave out --format)."
        )
    check_output_file(args.out, _MASK_SUFFIXES + _SEG_SUFFIXES)
    model_path = resolve_model(args.model)
    _check_inputs_exist(image_path)
    if as_seg and not image_path.is_dir() and not image_path.name.lower().endswith(".dcm"):
        raise FewLabelError(
            f"{image_path} is not a DICOM series, and a DICOM SEG can only reference one: "
            "write a NIfTI mask (--out mask.nii.gz), or give the scan's DICOM folder."
        )

    from napari_fewlabel.infer.predict import predict_volume_steps, run_to_end  # imports torch
    from napari_fewlabel.models.checkpoint import load_checkpoint

    model = load_checkpoint(model_path)
    image = load_volume(image_path)
    start = time.perf_counter()
    steps = predict_volume_steps(
        model,
        image,
        axis=args.axis,
        batch_size=args.batch_size,
        device=args.device,
        test_time_flips=args.flips,
    )
    bar = _ProgressBar(sys.stderr)
    labels = run_to_end(
        steps, lambda done, total: bar.count(done, total, "slices (all planes predicted along)")
    )
    bar.finish()
    if as_seg:
        from napari_fewlabel.io.dicom_seg import write_dicom_seg

        write_dicom_seg(labels, image, args.out, model.card.classes, algorithm_type="AUTOMATIC")
    else:
        info = MaskInfo.of_classes(model.card.classes)
        save_labels(labels, like=image, path=args.out, info=info)
    counts = np.bincount(labels.ravel(), minlength=len(model.card.classes))
    found = ", ".join(
        f"{c.name} {int(counts[c.index])}" for c in model.card.classes[1:] if counts[c.index]
    )
    print(
        f"Wrote {args.out} ({image.shape[0]}x{image.shape[1]}x{image.shape[2]} voxels, "
        f"{time.perf_counter() - start:.1f} s). Voxels per class: {found or 'none'}."
    )
    return 0


def _predict_cohort(args: argparse.Namespace) -> int:
    """`predict SCAN... --out-dir DIR`: the library's cohort run, with a progress bar."""
    from napari_fewlabel.io.atomic import check_output_folder
    from napari_fewlabel.models.registry import resolve_model

    out_dir = check_output_folder(args.out_dir, option="--out-dir")
    model_path = resolve_model(args.model)

    from napari_fewlabel.infer import cohort  # imports torch
    from napari_fewlabel.models.checkpoint import load_checkpoint

    with cohort.torchrun_ranks(args.device) as ranks:
        if not ranks.is_main:  # the other ranks print errors only
            logging.getLogger().setLevel(logging.ERROR)
        scans = cohort.find_scans_once(args.scans, ranks)
        model = load_checkpoint(model_path)
        bar = _ProgressBar(sys.stderr) if ranks.is_main else None
        share = f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else ""

        def show(result: Any, handled: int, total: int) -> None:
            assert bar is not None
            if result.status == "failed":
                bar.message(f"failed: {result.scan}: {result.reason}")
            elapsed = time.monotonic() - bar.started
            eta = elapsed / handled * (total - handled)
            bar.count(handled, total, f"scans{share}" + (f"  ETA {_duration(eta)}" if eta else ""))

        summary = cohort.predict_cohort(
            model,
            scans,
            out_dir,
            mask_format=cohort.MASK_FORMATS[args.format or "nifti"],
            device=args.device,
            axis=args.axis,
            batch_size=args.batch_size,
            test_time_flips=args.flips,
            ranks=ranks,
            on_result=show if bar is not None else None,
            details={"model": str(model_path)},
        )
        if bar is not None:
            bar.finish()
    if ranks.is_main:
        done, skipped = summary.count("done"), summary.count("skipped")
        procs = f" in {ranks.world_size} processes" if ranks.world_size > 1 else ""
        print(
            f"{len(summary.results)} scans: {done} segmented, {skipped} skipped, "
            f"{len(summary.failed)} failed ({summary.seconds:.1f} s{procs}). Masks, "
            f"{cohort.SUMMARY_CSV} and {cohort.SUMMARY_JSON} in {summary.out_dir}."
        )
        if summary.failed:
            print(f"fewlabel: {len(summary.failed)} scan(s) failed:", file=sys.stderr)
            for r in summary.failed:
                print(f"  {r.scan}: {r.reason}", file=sys.stderr)
    # Only rank 0 says how the cohort went: torchrun stops the other ranks as soon as one
    # exits with an error, which must not cut rank 0 short of its report.
    return 0 if summary.ok or not ranks.is_main else EXIT_USER_ERROR


# ------------------------------------------------------------------- suggest
def _add_suggest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "suggest",
        help="the unlabelled slices to label next: where the model's two streams disagree most",
    )
    p.add_argument("model", help="model name or .safetensors path (a fine-tuned model)")
    p.add_argument(
        "image", type=Path, help="the scan (NIfTI, NRRD, MetaImage, InVesalius or a DICOM folder)"
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="the annotation so far: its painted slices (and slices it marks empty) are not "
        "suggested",
    )
    p.add_argument("--n", type=int, default=5, help="how many slices (default 5)")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), help="slice axis (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_suggest)


def _cmd_suggest(args: argparse.Namespace) -> int:
    from napari_fewlabel.models.registry import resolve_model

    model_path = resolve_model(args.model)
    _check_inputs_exist(args.image, args.labels)

    from napari_fewlabel.infer.suggest import suggest_slices  # imports torch
    from napari_fewlabel.models.checkpoint import load_checkpoint

    model = load_checkpoint(model_path)
    image = load_volume(args.image)
    axis = model.card.slice_axis if args.axis is None else args.axis
    exclude: set[int] = set()
    if args.labels is not None:
        labels = load_volume(args.labels)
        if labels.shape != image.shape:
            raise FewLabelError(
                f"{args.labels.name} has shape {labels.shape} but the scan has {image.shape}: "
                "give the annotation drawn on this scan."
            )
        painted = np.moveaxis(labels.array != 0, axis, 0).reshape(image.shape[axis], -1)
        exclude.update(np.flatnonzero(painted.any(axis=1)).tolist())
        saved = read_mask_info(args.labels)
        if saved is not None and saved.empty_axis == axis:
            exclude.update(saved.empty_slices)
    picks = suggest_slices(model, image, n=args.n, exclude=exclude, axis=axis, device=args.device)
    if args.json:
        print(json.dumps({"axis": axis, "excluded": sorted(exclude),
                          "slices": [p.to_dict() for p in picks]}))  # fmt: skip
        return 0
    print(f"Slices to label next along axis {axis} ({len(exclude)} labelled left out):")
    print("rank  slice  voxels the streams disagree on  structure voxels")
    for rank, pick in enumerate(picks, start=1):
        print(f"{rank:>4}  {pick.index:>5}  {pick.disagreement:>30}  {pick.foreground:>16}")
    return 0


# ------------------------------------------------------------------ evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, HD95 and ASD per class of a mask against truth")
    p.add_argument("pred", type=Path, help="predicted label map (NIfTI)")
    p.add_argument("truth", type=Path, help="ground-truth label map on the same grid (NIfTI)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", help="comma-separated class names, background first")
    names.add_argument("--model", help="take class names from this model's card")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_fewlabel.io.atomic import atomic_path, check_output_file
    from napari_fewlabel.models.card import read_card
    from napari_fewlabel.models.registry import resolve_model

    if args.json is not None:
        check_output_file(args.json, (".json",), option="--json")
    _check_inputs_exist(args.pred, args.truth)
    names: list[str] | None = None
    if args.classes:
        names = [n.strip() for n in args.classes.split(",")]
    elif args.model:
        names = list(read_card(resolve_model(args.model)).class_names)

    from napari_fewlabel.infer.metrics import class_metrics

    pred = load_volume(args.pred)
    truth = load_volume(args.truth)
    if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-2):
        raise FewLabelError(
            f"{args.pred.name} and {args.truth.name} are not on the same grid (shapes "
            f"{pred.shape} vs {truth.shape} or different voxel-to-world transforms): "
            "compare masks of the same scan."
        )
    results = class_metrics(
        _as_labels(pred.array, args.pred.name),
        _as_labels(truth.array, args.truth.name),
        pred.spacing_mm,
        class_names=names,
    )
    rows = [
        f"{'class':<24} {'Dice':>7} {'HD95 mm':>9} {'ASD mm':>8} {'pred vox':>10} {'true vox':>10}"
    ]
    for r in results:
        rows.append(
            f"{f'{r.index} {r.name}':<24} {r.dice:>7.3f} {_fmt(r.hd95_mm):>9} "
            f"{_fmt(r.asd_mm):>8} {r.voxels_pred:>10} {r.voxels_truth:>10}"
        )
    mean_dice = float(np.mean([r.dice for r in results])) if results else float("nan")
    rows.append(f"{'mean':<24} {mean_dice:>7.3f}")
    print("\n".join(rows))
    if args.json:
        report = {
            "pred": str(args.pred),
            "truth": str(args.truth),
            "spacing_mm": list(pred.spacing_mm),
            "mean_dice": _json_number(mean_dice),
            "classes": [
                {
                    "index": r.index,
                    "name": r.name,
                    "dice": _json_number(r.dice),
                    "hd95_mm": _json_number(r.hd95_mm),
                    "asd_mm": _json_number(r.asd_mm),
                    "voxels_pred": r.voxels_pred,
                    "voxels_truth": r.voxels_truth,
                }
                for r in results
            ],
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _as_labels(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if np.any(array != np.round(array)):
            raise FewLabelError(f"{name} holds non-integer values: give a label map.")
        return array.astype(np.int64)
    return array


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _json_number(value: float) -> float | None:
    """NaN (undefined distance) becomes JSON null."""
    return None if math.isnan(value) else round(float(value), 4)


# ------------------------------------------------------------------ models
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the named models (shipped encoders and your own) and where they live",
        description="List the models that --model and the napari widget know by name: the "
        "encoders shipped with napari-fewlabel and the .safetensors files in your model folder.",
    )
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_fewlabel.models.card import is_encoder_only, read_card
    from napari_fewlabel.models.registry import DEFAULT_ENCODER, list_models, user_model_dir

    print(f"your model folder: {user_model_dir()}")
    entries = list_models()
    if not entries:
        print("no named models yet")
        return 0
    print(f"{'name':<24} {'source':<8} {'kind':<22} {'modality':<8} classes")
    for entry in entries:
        try:
            card = read_card(entry.path)
        except FewLabelError as exc:
            print(f"{entry.name:<24} {entry.source:<8} unreadable: {exc}")
            continue
        if is_encoder_only(card):
            kind = "pretrained encoder" + (" *" if entry.name == DEFAULT_ENCODER else "")
            classes = "-"
        else:
            kind = "segmentation model"
            classes = ", ".join(card.class_names[1:])
        print(f"{entry.name:<24} {entry.source:<8} {kind:<22} {card.modality:<8} {classes}")
    print("* fine-tuning starts from this encoder unless --model says otherwise")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewlabel",
        description="Annotation-efficient MRI/CT segmentation: label a few slices, "
        "fine-tune, predict the volume.",
    )
    parser.add_argument("--version", action="version", version=f"napari-fewlabel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_info(sub)
    _add_finetune(sub)
    _add_pretrain(sub)
    _add_adapt(sub)
    _add_predict(sub)
    _add_suggest(sub)
    _add_evaluate(sub)
    _add_emphysema(sub)
    _add_models(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fewlabel`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except FewLabelError as e:
        print(f"fewlabel: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fewlabel: interrupted; the last checkpoint written is complete.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
