"""Pretraining: does the shipped encoder help, does decorrelation fight collapse, how fast.

    python benchmarks/pretraining.py > pretraining.json      # about 40 minutes on 2 CPU cores

Three parts, one JSON document on stdout (rows also go to ``--results`` as JSON
lines, so an interrupted run resumes):

1. ``annotation_efficiency``: the table of ``benchmarks/annotation_efficiency.py``
   (MNI152 T1 at 2 mm, GM/WM, Dice on every unlabelled axial slice) for the
   product's default fine-tuning from a random initialisation and from each
   shipped encoder, at k = 1, 2, 4 labelled slices; same seeds, same steps.
   The MNI152 template is not in the encoders' pretraining data.
   ``--volume cardiac-ct`` runs the same table on the synthetic cardiac CT
   phantom (CT, five structures; a second, different target).
   ``--volume brain-tumour`` runs it on a real lesion: the brain tumour contour
   of pyradiomics' brain1 MRI, a target no intensity threshold gives. The
   shipped encoders saw brain1 (unlabelled) in pretraining, so this target takes
   encoders made by the same recipe without it (``--encoders``; see
   ``scripts/pretrain_shipped_encoders.sh``, EXCLUDE); the script refuses an
   encoder whose model card lists the scan it evaluates on.
   ``--volume lung-tumour`` is a second real lesion, in CT: the lung tumour
   contour of pyradiomics' lung2 (11 of 61 slices), with encoders made without
   lung2 (EXCLUDE=lung2_image.nrrd).
2. ``collapse``: the effective rank of the embeddings (train/collapse.py) after
   the same short med-moco run with and without the decorrelation term.
3. ``throughput``: pretraining slices per second of each method on this
   machine's device (``--device``).

``--device cuda`` runs every part on a GPU; its rows record the device. A GPU
run does not reproduce a seed exactly (bfloat16, non-deterministic kernels),
so compare GPU rows as independent runs, not paired by seed.
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
from annotation_efficiency import (
    CLASS_NAMES,
    dice_on_unlabelled,
    evenly_spread,
    mni_volume,
    train_monai,
    train_ours,
)

from napari_fewlabel.data.phantoms import cardiac_phantom
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io import Volume, load_volume
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.models.registry import SHIPPED_MODEL_DIR
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import DEFAULT_STEPS, FinetuneSettings
from napari_fewlabel.train.pretrain import PretrainJob, PretrainSettings, run

#: Where scripts/fetch_test_data.sh puts the pyradiomics scans.
PYRADIOMICS = Path.home() / ".cache/napari-fewlabel/test-data/pyradiomics"


def public_archive() -> list[Path]:
    """The scans the shipped encoders were pretrained on (scripts/pretrain_shipped_encoders.sh)."""
    import dipy
    import nibabel

    scans = [
        Path(nibabel.__file__).parent / "tests/data/anatomical.nii",
        Path(dipy.__file__).parent / "data/files/S0_10slices.nii.gz",
        PYRADIOMICS / "brain1_image.nrrd",
        PYRADIOMICS / "brain2_image.nrrd",
        PYRADIOMICS / "breast1_image.nrrd",
        PYRADIOMICS / "lung2_image.nrrd",
    ]
    missing = [str(p) for p in scans if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `bash scripts/fetch_test_data.sh` first")
    return scans


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), file=sys.stderr, flush=True)


#: Full-resolution channels of the default network, part of every row's key: rows
#: without it are from the 8-channel network of before 2026-11-22.
NET_WIDTH = UNetConfig().full_res_width

#: What the annotation-efficiency part can run on: a description for the report.
VOLUMES = {
    "mni": "MNI152 2009c T1 at 2 mm; GM/WM; Dice on all unlabelled axial slices",
    "cardiac-ct": (
        "synthetic cardiac CT phantom (data/phantoms.py, seed 1, 32x96x96 at 3x2x2 mm); five "
        "structures; Dice on all unlabelled axial slices"
    ),
    "brain-tumour": (
        "pyradiomics brain1 MRI (25x256x256 at 6.5x0.78x0.78 mm) with its tumour contour "
        "(7 slices); Dice of the tumour on all unlabelled axial slices; encoders pretrained "
        "without brain1"
    ),
    "lung-tumour": (
        "pyradiomics lung2 chest CT (61x512x512 at 5x0.63x0.63 mm) with its tumour contour "
        "(11 slices); Dice of the tumour on all unlabelled axial slices; encoders pretrained "
        "without lung2"
    ),
}

#: The name of the optional yardstick row (``--monai``).
MONAI = "MONAI UNet (same size, same slices, same steps)"

#: The scan file of each real target, which an encoder must not have been pretrained on.
TARGET_SCANS = {
    "brain-tumour": PYRADIOMICS / "brain1_image.nrrd",
    "lung-tumour": PYRADIOMICS / "lung2_image.nrrd",
}


def evaluation_volume(name: str) -> tuple[Volume, np.ndarray, tuple[str, ...]]:
    """The scan, its full labels and class names of one annotation-efficiency target."""
    if name == "cardiac-ct":
        phantom = cardiac_phantom("CT", 1, (32, 96, 96), (3.0, 2.0, 2.0))
        return phantom.image, phantom.labels.array, tuple(c.name for c in phantom.classes)
    if name in TARGET_SCANS:
        scan = TARGET_SCANS[name]
        contour = scan.with_name(scan.name.replace("_image", "_label"))
        if not contour.exists():
            raise SystemExit(f"missing {contour}: run `bash scripts/fetch_test_data.sh` first")
        truth = (np.asarray(load_volume(contour).array) > 0).astype(np.uint8)
        return load_volume(scan), truth, ("background", "tumour")
    image, truth = mni_volume(2)
    return image, truth, CLASS_NAMES


def foreground_on_empty_slices(pred: np.ndarray, truth: np.ndarray, labelled: list[int]) -> int:
    """Voxels predicted as any structure on the unlabelled slices whose truth has none.

    On the tumour target these false positives away from the lesion are what
    separates the starts (docs/benchmarks.md).
    """
    empty = [z for z in range(truth.shape[0]) if z not in labelled and not truth[z].any()]
    return int((pred[empty] > 0).sum())


def empty_either_side(truth: np.ndarray) -> list[int]:
    """One structure-free slice on each side of the structure, halfway to the end of the scan.

    What a user marks empty after scrolling through (FinetuneJob.empty_slices),
    chosen without looking at any prediction.
    """
    z = np.flatnonzero(truth.any(axis=(1, 2)))
    lo, hi, last = int(z[0]), int(z[-1]), truth.shape[0] - 1
    return ([lo // 2] if lo > 0 else []) + ([(hi + 1 + last) // 2] if hi < last else [])


def check_not_pretrained_on(encoder: Path, scan: Path) -> None:
    """Refuse an encoder whose model card lists ``scan`` among its pretraining data.

    That includes the data of the encoders it continued from (``fewlabel pretrain --init``).
    """
    training = read_card(encoder).training
    scans = list(training.get("data", {}).get("scans", []))
    earlier = training.get("continued_from")
    while earlier:
        scans += earlier.get("scans", [])
        earlier = earlier.get("continued_from")
    if any(Path(s["path"]).name == scan.name for s in scans):
        raise SystemExit(
            f"{encoder} was pretrained on {scan.name}, the scan this target evaluates on. "
            f"Make encoders without it: EXCLUDE={scan.name} OUT=DIR bash "
            "scripts/pretrain_shipped_encoders.sh, then pass them with --encoders."
        )


def cpu_model() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def annotation_efficiency(
    encoders: list[Path],
    ks: list[int],
    seeds: list[int],
    steps: int,
    results: Path,
    done: list,
    volume: str = "mni",
    monai: bool = False,
    device: str = "cpu",
    encoder_frozen_for: float = 0.0,
    mark_empty: bool = False,
    empty_share: float = 1.0,
    random_init: bool = True,
    encoder_saw_target: bool = False,
) -> None:
    image, truth, class_names = evaluation_volume(volume)
    if volume in TARGET_SCANS and not encoder_saw_target:
        for encoder in encoders:
            check_not_pretrained_on(encoder, TARGET_SCANS[volume])
    starts: list[tuple[str, str | None]] = [("random init", None)] if random_init else []
    starts += [(p.stem, str(p)) for p in encoders]
    if monai:  # the yardstick: a plain MONAI UNet of the same size on the same slices
        starts.append((MONAI, None))
    work = Path(tempfile.mkdtemp(prefix="fewlabel-pretraining-"))
    for seed in seeds:
        for k in ks:
            labelled = evenly_spread(truth, k)
            partial = np.zeros_like(truth)
            partial[labelled] = truth[labelled]
            empty = empty_either_side(truth) if mark_empty else []
            for name, encoder in starts:
                key = {"part": "annotation_efficiency", "start": name, "k": k, "seed": seed}
                key["steps"] = steps
                key["full_res_width"] = NET_WIDTH
                if volume != "mni":  # rows without "volume" are MNI rows
                    key["volume"] = volume
                if device != "cpu":  # rows without "device" ran on the CPU
                    key["device"] = device
                else:  # a CPU seed reproduces only on the same processor (rows before 2026-11-23 lack it)
                    key["cpu"] = cpu_model()
                if empty:  # rows without it had only the k painted slices
                    key["empty_slices"] = empty
                if encoder is not None and encoder_frozen_for:  # a random start has none to freeze
                    key["encoder_frozen_for"] = encoder_frozen_for
                if empty and empty_share != 1:  # rows without it drew every given slice equally
                    key["empty_share"] = empty_share
                if encoder is not None and encoder_saw_target:  # its pixels, never its labels
                    key["encoder_saw_target"] = True
                if any(
                    all(r.get(f) == v for f, v in key.items())
                    and r.get("volume", "mni") == volume
                    and r.get("device", "cpu") == device
                    and r.get("encoder_frozen_for", 0.0) == key.get("encoder_frozen_for", 0.0)
                    and r.get("empty_slices", []) == empty
                    and r.get("empty_share", 1.0) == key.get("empty_share", 1.0)
                    and r.get("cpu") == key.get("cpu")
                    and r.get("encoder_saw_target", False) == key.get("encoder_saw_target", False)
                    for r in done
                ):
                    continue
                if name == MONAI:
                    if empty:
                        continue  # the yardstick knows no empty slices
                    model, summary = train_monai(image, partial, steps, seed, class_names, device)
                else:
                    method = "default" if encoder is None else "pretrained"
                    changes: dict[str, Any] = {"empty_share": empty_share}
                    if encoder:
                        changes["encoder_frozen_for"] = encoder_frozen_for
                    model, summary = train_ours(
                        method,
                        image,
                        partial,
                        steps,
                        seed,
                        encoder,
                        work,
                        class_names,
                        device,
                        tuple(empty),
                        **changes,
                    )
                pred = predict_volume(model, image, axis=0, device=device)
                row = {
                    **key,
                    "labelled_slices": labelled,
                    # Slices marked empty were given, like the painted ones: not scored.
                    "dice": dice_on_unlabelled(pred, truth, labelled + empty, class_names),
                    "foreground_voxels_on_empty_slices": foreground_on_empty_slices(
                        pred, truth, labelled + empty
                    ),
                    "train_seconds": summary.get("train_seconds"),
                    "started_from": model.card.training.get("started_from"),
                    # A CPU seed reproduces only at the same thread count (and processor).
                    "torch_threads": torch.get_num_threads(),
                }
                if encoder is not None:
                    row["encoder_steps"] = read_card(encoder).training.get("steps_done")
                _append(results, row)
                done.append(row)


def _pretrain(settings: PretrainSettings, steps: int, device: str, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job = PretrainJob(
            data=tuple(public_archive()),
            out=Path(tmp) / "encoder.safetensors",
            settings=settings,
            steps=steps,
            device=device,
            seed=seed,
            checkpoint_every=10**9,
        )
        final = None
        for event in run(job):
            if isinstance(event, Done):
                final = event
        assert final is not None
        return dict(final.summary)


def collapse_and_throughput(steps: int, device: str, seed: int, results: Path, done: list) -> None:
    medmoco = PretrainSettings.for_method("medmoco")
    runs = {
        "medmoco": medmoco,
        "medmoco without decorrelation": replace(medmoco, decorrelation_weight=0.0),
        "ideal": PretrainSettings.for_method("ideal"),
    }
    for name, settings in runs.items():
        key = {"part": "pretraining", "run": name, "steps": steps, "device": device}
        key["full_res_width"] = NET_WIDTH
        if any(all(r.get(f) == v for f, v in key.items()) for r in done):
            continue
        start = time.perf_counter()
        summary = _pretrain(settings, steps, device, seed)
        row = {
            **key,
            "decorrelation_weight": settings.decorrelation_weight,
            "effective_rank": summary.get("effective_rank"),
            "effective_rank_projection": summary.get("effective_rank_projection"),
            "slices_per_s": summary.get("slices_per_s"),
            "final_losses": summary.get("final_losses"),
            "device_used": summary.get("device"),
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        _append(results, row)
        done.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fine-tuning steps")
    parser.add_argument(
        "--encoders",
        type=Path,
        nargs="*",
        default=sorted(SHIPPED_MODEL_DIR.glob("*-encoder.safetensors")),
        help="pretrained starts beside random init (none: random init only)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=100, help="per collapse run")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where fine-tuning, prediction and the pretraining runs train (rows record a GPU)",
    )
    parser.add_argument("--results", type=Path, default=Path("pretraining.jsonl"))
    parser.add_argument("--skip", nargs="*", default=[], choices=("finetune", "pretrain"))
    parser.add_argument(
        "--volume",
        choices=tuple(VOLUMES),
        default="mni",
        help="annotation-efficiency target: the MNI template (default), the cardiac CT phantom "
        "or a real brain (MRI) or lung (CT) tumour (needs --encoders pretrained without it)",
    )
    parser.add_argument(
        "--monai",
        action="store_true",
        help="add the yardstick row: a plain MONAI UNet of the same size trained on the same "
        "slices for the same steps (benchmarks/annotation_efficiency.py)",
    )
    parser.add_argument(
        "--encoder-frozen-for",
        type=float,
        default=0.0,
        help="FinetuneSettings.encoder_frozen_for for the pretrained starts (LP-FT); rows record it",
    )
    parser.add_argument(
        "--mark-empty",
        action="store_true",
        help="also give one structure-free slice on each side of the structure, marked empty "
        "(FinetuneJob.empty_slices); rows record them",
    )
    parser.add_argument(
        "--empty-share",
        type=float,
        default=FinetuneSettings().empty_share,
        help="FinetuneSettings.empty_share with --mark-empty: the most the marked slices take "
        "of the labelled draws (1 = every given slice equally, as before 2026-11-23); rows record it unless 1",
    )
    parser.add_argument(
        "--no-random-init",
        action="store_true",
        help="leave out the random-init rows (e.g. when another process runs them)",
    )
    parser.add_argument(
        "--encoder-saw-target",
        action="store_true",
        help="allow encoders pretrained on the target scan's unlabelled pixels (never its "
        "labels), as IDEAL pretrains on the target data set; rows record encoder_saw_target",
    )
    args = parser.parse_args()
    done: list[dict[str, Any]] = []
    if args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    if "finetune" not in args.skip:
        annotation_efficiency(
            args.encoders,
            args.k,
            args.seeds,
            args.steps,
            args.results,
            done,
            args.volume,
            args.monai,
            args.device,
            args.encoder_frozen_for,
            args.mark_empty,
            args.empty_share,
            not args.no_random_init,
            args.encoder_saw_target,
        )
    if "pretrain" not in args.skip:
        collapse_and_throughput(args.pretrain_steps, args.device, 0, args.results, done)
    # Report the rows of today's default network (older rows stay in --results).
    done = [r for r in done if r.get("full_res_width", 8) == NET_WIDTH]
    report = {
        "machine": f"{torch.get_num_threads()} torch threads, device {args.device}",
        "annotation_efficiency": {
            name: {
                "data": text,
                "rows": [
                    r
                    for r in done
                    if r["part"] == "annotation_efficiency" and r.get("volume", "mni") == name
                ],
            }
            for name, text in VOLUMES.items()
        },
        "pretraining": [r for r in done if r["part"] == "pretraining"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
