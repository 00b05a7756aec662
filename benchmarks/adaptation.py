"""MRI -> CT adaptation (Dou et al. 2018) on the synthetic cardiac phantom pair.

    python benchmarks/adaptation.py > adaptation.json     # about 6 minutes on 2 CPU cores

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

The real head pair of DATA.md (ITK T1 -> InVesalius CT) is not measured yet.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.data.phantoms import CardiacPhantom, cardiac_phantom
from napari_fewlabel.infer.predict import predict_volume
from napari_fewlabel.models.checkpoint import SegmentationModel, load_checkpoint
from napari_fewlabel.models.unet2d import UNetConfig
from napari_fewlabel.train import adapt, finetune
from napari_fewlabel.train.events import Progress


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
    phantom: CardiacPhantom, out: Path, steps: int, net: UNetConfig, device: str
) -> Path:
    job = finetune.FinetuneJob(
        image=phantom.image,
        labels=phantom.labels,
        out=out,
        classes=phantom.classes,
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
    source = train_supervised(mr, folder / "mr.safetensors", args.source_steps, net, args.device)
    source_model = load_checkpoint(source)
    window = NormalizationConfig("ct_window")
    as_ct = replace(source_model, card=replace(source_model.card, normalization=window))
    row: dict[str, Any] = {
        "shape_zyx": list(shape),
        "network_widths": list(net.widths),
        "source_steps": args.source_steps,
        "adapt_steps": args.adapt_steps,
        "source_on_mr": mean_dice(source_model, cardiac_phantom("MR", 1, shape, spacing)),
        "source_on_ct": mean_dice(source_model, ct),
        "source_on_ct_hu_window": mean_dice(as_ct, ct),
    }
    t1 = time.perf_counter()
    job = adapt.AdaptJob(
        source_model=source,
        target=(ct.image,),
        source=(mr.image,),
        out=folder / "adapted.safetensors",
        steps=args.adapt_steps,
        device=args.device,
        settings=adapt.AdaptSettings(warmup_steps=args.warmup),
        checkpoint_every_s=1e9,
    )
    curve = []
    for event in adapt.run(job):
        if isinstance(event, Progress) and event.step % 10 == 0:
            curve.append([event.step, round(event.losses["wasserstein"], 3)])
    row["adapted"] = mean_dice(load_checkpoint(job.out), ct)
    row["adapt_seconds"] = round(time.perf_counter() - t1, 1)
    row["wasserstein_every_10_steps"] = curve
    upper = train_supervised(
        cardiac_phantom("CT", 0, shape, spacing),
        folder / "ct.safetensors",
        args.source_steps,
        net,
        args.device,
    )
    row["ct_supervised"] = mean_dice(load_checkpoint(upper), ct)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source-steps", type=int, default=700)
    parser.add_argument("--adapt-steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"phantom": phantom_pair(args, Path(tmp))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
