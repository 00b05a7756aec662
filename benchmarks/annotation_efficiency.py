"""Annotation efficiency on a real brain MRI: Dice on unlabelled slices vs labelled slices.

Data: the MNI ICBM152 2009c T1 template with its grey/white-matter probability
maps (shipped inside the nilearn wheel; ``pip install nilearn``), by default
block-averaged to 2 mm so that the whole table fits in a few CPU hours. Labels:
background unless max(GM, WM) >= 0.5, then the larger of the two
(1 = grey matter, 2 = white matter). ``k`` axial slices, evenly spread over the
slices that contain brain, are given as labelled; every other slice of the
volume is scored (Dice per class over all those voxels, mean of GM and WM).

Methods (same data, same seeds, same number of steps):

* ``monai_unet``: a plain MONAI ``UNet`` of the same size (2.5 M parameters, single-slice input,
  Dice + CE, the same weak augmentation, 8 labelled slices per step), the
  yardstick a user could build in an afternoon;
* ``supervised``: our network and defaults with the unlabelled term off   (a);
* ``paper``: IDEAL fine-tuning as published (CPS from step 0 under a sigmoid
  ramp, all pseudo-labels, one view, single-slice input)                  (b);
* ``default``: the product defaults (see docs/engine.md)                   (b*);
* ablation rows between ``paper`` and ``default`` (``+2.5d``, ``+warmup``,
  ``+threshold``; ``default`` adds the weak/strong view pairing), ``default_1slice``
  (``default`` with a single slice in) and beyond it
  (``+flips``: flip augmentation and TTA; ``+holdout``: hold out a validation
  slice from 2 labelled slices on; ``+steps2x``: twice the steps);
* ``pretrained`` (c): ``default`` started from ``--encoder``, once pretraining exists.

Every trained model is scored with and without flip test-time augmentation.
Results are appended to ``--results`` (JSON lines, so a long run can be
resumed) and printed as one JSON document at the end::

    python benchmarks/annotation_efficiency.py --k 1 2 4 8 \
        --methods monai_unet supervised paper default > annotation_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from napari_fewlabel.data.augment import AugmentConfig, jitter_intensity, random_geometry, warp
from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.input_fit import choose_input_size
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import ModelCard, SegmentationModel, load_checkpoint
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import (
    DEFAULT_STEPS,
    RANDOM_INIT,
    FinetuneJob,
    FinetuneSettings,
    run,
)

CLASS_NAMES = ("background", "grey matter", "white matter")


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``^3 blocks (the edge that does not fill a block is dropped)."""
    if factor == 1:
        return array
    z, y, x = (s // factor for s in array.shape)
    blocks = array[: z * factor, : y * factor, : x * factor].reshape(
        z, factor, y, factor, x, factor
    )
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def mni_volume(resolution_mm: int = 2) -> tuple[Volume, np.ndarray]:
    """The MNI152 T1 (display orientation) and its 3-class label map at 1 or 2 mm.

    At 2 mm the T1 and the probability maps are block-averaged before the
    labels are thresholded, as a 2 mm acquisition would see them.
    """
    try:
        import nilearn
    except ImportError:
        sys.exit("This benchmark needs the MNI152 maps shipped with nilearn: pip install nilearn")
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {
        k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")
    }
    t1 = nib.load(str(files["t1"]))
    affine = t1.affine @ np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
    maps = {
        k: _block_mean(nib.load(str(f)).get_fdata(dtype=np.float32), resolution_mm)
        for k, f in files.items()
    }
    image = Volume.from_file_array(maps["t1"], affine, modality="MR")
    gm = Volume.from_file_array(maps["gm"], affine, modality="MR").array
    wm = Volume.from_file_array(maps["wm"], affine, modality="MR").array
    labels = np.where(np.maximum(gm, wm) >= 0.5, np.where(wm > gm, 2, 1), 0)
    return image, labels.astype(np.uint8)


def evenly_spread(labels: np.ndarray, k: int) -> list[int]:
    """``k`` axial slices at the centres of ``k`` equal parts of the brain's extent."""
    brain = np.flatnonzero(labels.any(axis=(1, 2)))
    lo, hi = int(brain[0]), int(brain[-1])
    return [int(lo + (i + 0.5) * (hi - lo + 1) / k) for i in range(k)]


def dice_on_unlabelled(
    pred: np.ndarray,
    truth: np.ndarray,
    labelled: list[int],
    class_names: tuple[str, ...] = CLASS_NAMES,
) -> dict[str, float]:
    keep = np.ones(truth.shape[0], dtype=bool)
    keep[labelled] = False
    p, t = pred[keep], truth[keep]
    out = {}
    for k, name in enumerate(class_names[1:], start=1):
        denom = int((p == k).sum() + (t == k).sum())
        out[name] = 2 * int(((p == k) & (t == k)).sum()) / denom if denom else 1.0
    out["mean"] = float(np.mean([out[n] for n in class_names[1:]]))
    return {k: round(v, 4) for k, v in out.items()}


# ------------------------------------------------------------------ methods
def settings_for(method: str) -> tuple[FinetuneSettings, UNetConfig, int]:
    """Settings, architecture and step multiplier of a named method."""
    paper = FinetuneSettings.paper()
    default = FinetuneSettings()
    arch = UNetConfig()
    single = replace(arch, in_slices=1)
    table: dict[str, tuple[FinetuneSettings, UNetConfig, int]] = {
        "supervised": (FinetuneSettings.supervised(), arch, 1),
        "supervised_1slice": (FinetuneSettings.supervised(), single, 1),
        "paper": (paper, single, 1),
        "+2.5d": (paper, arch, 1),
        "+warmup": (
            replace(
                paper, supervised_warmup=default.supervised_warmup, cps_rampup=default.cps_rampup
            ),
            arch,
            1,
        ),
        "+threshold": (
            replace(
                paper,
                supervised_warmup=default.supervised_warmup,
                cps_rampup=default.cps_rampup,
                confidence_threshold=default.confidence_threshold,
            ),
            arch,
            1,
        ),
        "default": (default, arch, 1),
        "default_1slice": (default, single, 1),
        "+flips": (
            replace(default, augment=AugmentConfig(flips=True), test_time_flips=True),
            arch,
            1,
        ),
        "+holdout": (replace(default, validation_min_labelled=2), arch, 1),
        "+steps2x": (default, arch, 2),
        "pretrained": (default, arch, 1),
    }
    if method not in table:
        raise SystemExit(f"unknown method {method!r}; choose from monai_unet, {', '.join(table)}")
    return table[method]


def train_ours(
    method: str,
    image: Volume,
    partial: np.ndarray,
    steps: int,
    seed: int,
    encoder: str | None,
    workdir: Path,
    class_names: tuple[str, ...] = CLASS_NAMES,
    device: str = "cpu",
    empty_slices: tuple[int, ...] = (),
    **setting_changes: Any,
) -> tuple[SegmentationModel, dict[str, Any]]:
    """Fine-tune ``method`` (settings_for) on ``partial`` (+ slices marked empty); ``setting_changes`` override its settings."""
    settings, arch, multiplier = settings_for(method)
    settings = replace(settings, **setting_changes)
    job = FinetuneJob(
        image=image,
        labels=partial,
        out=workdir / f"{method}.safetensors",
        classes=named_classes(class_names),
        # "pretrained": --encoder, else the shipped default; every other row: random init.
        model=encoder if method == "pretrained" else RANDOM_INIT,
        axis=0,
        empty_slices=empty_slices,
        steps=steps * multiplier,
        device=device,
        seed=seed,
        settings=settings,
        architecture=arch,
    )
    done = None
    for event in run(job):
        if isinstance(event, Done):
            done = event
    assert done is not None and done.checkpoint is not None
    return load_checkpoint(done.checkpoint), dict(done.summary)


class _MonaiWrapper(torch.nn.Module):
    """Lets ``predict_volume`` drive a MONAI UNet (single softmax stream)."""

    def __init__(self, net: torch.nn.Module, config: UNetConfig) -> None:
        super().__init__()
        self.net = net
        self.config = config

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def monai_unet(num_classes: int, in_channels: int = 1) -> torch.nn.Module:
    """MONAI's UNet with about our network's parameter count (2.5 M) and FLOPs per slice."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=(20, 40, 80, 160, 320),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def train_monai(
    image: Volume,
    partial: np.ndarray,
    steps: int,
    seed: int,
    class_names: tuple[str, ...] = CLASS_NAMES,
    device: str = "cpu",
) -> tuple[SegmentationModel, dict[str, Any]]:
    """A plain MONAI UNet on the labelled slices: Dice + CE, weak augmentation, AdamW.

    Batches are drawn and augmented on the CPU (the same random stream on every
    device) and trained in float32 on ``device``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    defaults = FinetuneSettings()
    batch = defaults.batch_labelled + defaults.batch_unlabelled  # same slices per step as ours
    normalization = NormalizationConfig.for_modality(image.modality)
    input_size = choose_input_size(image.shape[1:], max_side=256, multiple=16)
    stack = SliceStack(image.array, 0, fit_intensity(image.array, normalization), input_size)
    labelled = np.flatnonzero(partial.any(axis=(1, 2)))
    targets = fit_labels(partial.astype(np.int64), 0, labelled, stack.fit)
    net = monai_unet(len(class_names)).to(device)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=defaults.learning_rate, weight_decay=defaults.weight_decay
    )
    aug = defaults.augment
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:  # the same schedule as ours
            decay = max(0.0, (step / steps - 0.75) / 0.25)
            group["lr"] = (
                defaults.learning_rate
                * min(1.0, (step + 1) / 10)
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))
            )
        pick = rng.integers(0, len(labelled), size=batch)
        x = stack.windows(torch.from_numpy(labelled[pick]), 1)
        x, y = warp(x, targets[pick], random_geometry(batch, aug, generator, torch.device("cpu")))
        x = jitter_intensity(
            x, generator, contrast=aug.contrast, brightness=aug.brightness, noise_std=aug.noise_std
        )
        loss, _ = dice_ce_loss(net(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    config = UNetConfig(in_slices=1, num_classes=len(class_names))
    card = ModelCard(
        architecture=config.to_dict(),
        classes=named_classes(class_names),
        modality=image.modality,
        normalization=normalization,
        input_size=input_size,
        slice_axis=0,
    )
    model = SegmentationModel(_MonaiWrapper(net.cpu().eval(), config), card)  # type: ignore[arg-type]
    return model, {"steps_done": steps, "train_seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--methods", nargs="+", default=["monai_unet", "supervised", "paper", "default"]
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--encoder", help="pretrained model for the 'pretrained' row")
    parser.add_argument("--results", type=Path, default=Path("annotation_efficiency.jsonl"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fewlabel-benchmark"))
    parser.add_argument(
        "--resolution-mm",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: the template as shipped (197x233x189); 2: block-averaged (98x116x94), 4x cheaper",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.workdir.mkdir(parents=True, exist_ok=True)

    image, truth = mni_volume(args.resolution_mm)
    done = []
    if args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    for seed in args.seeds:
        for k in args.k:
            labelled = evenly_spread(truth, k)
            partial = np.zeros_like(truth)
            partial[labelled] = truth[labelled]
            for method in args.methods:
                key = {
                    "method": method,
                    "k": k,
                    "seed": seed,
                    "steps": args.steps,
                    "mm": args.resolution_mm,
                }
                if any(all(r.get(f) == v for f, v in key.items()) for r in done):
                    continue
                if method == "pretrained" and not args.encoder:
                    continue
                start = time.perf_counter()
                if method == "monai_unet":
                    model, summary = train_monai(image, partial, args.steps, seed)
                else:
                    model, summary = train_ours(
                        method, image, partial, args.steps, seed, args.encoder, args.workdir
                    )
                row: dict[str, Any] = {
                    **key,
                    "labelled_slices": labelled,
                    "train_seconds": summary.get("train_seconds"),
                    "val_dice": summary.get("val_dice"),
                }
                for flips in (False, True):
                    pred = predict_volume(model, image, axis=0, device="cpu", test_time_flips=flips)
                    row["tta" if flips else "plain"] = dice_on_unlabelled(pred, truth, labelled)
                row["wall_seconds"] = round(time.perf_counter() - start, 1)
                with args.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    report = {
        "data": f"MNI ICBM152 2009c T1 at {args.resolution_mm} mm, {image.shape} (z, y, x); "
        "labels GM/WM from the 0.5-thresholded maps",
        "score": "Dice on all unlabelled axial slices, mean of grey and white matter",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "results": [
            r
            for r in done
            if r["k"] in args.k
            and r["method"] in args.methods
            and r.get("mm") == args.resolution_mm
        ],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
