"""Would a 3D-feature prior help our network? Fuse their probabilities and score.

One tri-planar fine-tuning run per (case, k) of the few-slice suite; its
three-plane probabilities are averaged with a small MLP's on 3D filter
features (``feature_prior.FeaturePrior``, the ilastik idea) at weights
``w`` = 0 (the network alone) ... 1 (the prior alone), and each fusion is
scored as the suite scores. JSON lines::

    python benchmarks/prior_fusion.py mni-gm-wm:1 brain-tumour:2 --results prior_fusion.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from feature_prior import FeaturePrior
from fewslice_cases import load_case
from fewslice_suite import partial_labels, score
from pretraining import _append, cpu_model

from napari_fewlabel.data.classes import named_classes
from napari_fewlabel.data.input_fit import InputFit
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.planes import plane_fit
from napari_fewlabel.infer.predict import _PlaneRun
from napari_fewlabel.models.checkpoint import load_checkpoint
from napari_fewlabel.train.events import Done
from napari_fewlabel.train.finetune import FinetuneJob, FinetuneSettings, run

WEIGHTS = (0.0, 0.3, 0.4, 0.5, 0.7, 1.0)


def network_probabilities(model, volume) -> torch.Tensor:
    """The mean of the three planes' probabilities, ``(K, z, y, x)``."""
    card, array = model.card, volume.array
    mapping = fit_intensity(array, card.normalization)
    main_fit = InputFit(array.shape[1:], card.input_size)
    runner = _PlaneRun(model.network.eval(), array, mapping, torch.device("cpu"), 4, False)
    planes = card.inference["planes"]
    total = torch.zeros(len(card.classes), *array.shape)
    for plane in planes:
        fit = plane_fit(
            array.shape, volume.spacing_mm, 0, plane, main_fit,
            model.network.config.size_divisor, card.inference["plane_max_side"],
        )  # fmt: skip
        for start, stop, proba in runner.along(plane, fit):
            total.movedim(plane + 1, 1)[:, start:stop] += proba.transpose(0, 1) / len(planes)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="case:k, e.g. mni-gm-wm:1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=128)
    parser.add_argument("--results", type=Path, default=Path("prior_fusion.jsonl"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fewlabel-prior-fusion"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        name, k_text = spec.split(":")
        case = load_case(name, args.max_side)
        partial, labelled = partial_labels(case.truth, int(k_text))
        job = FinetuneJob(
            image=case.image,
            labels=partial,
            out=args.workdir / f"{name}.safetensors",
            classes=named_classes(case.class_names),
            axis=0,
            steps=args.steps,
            seed=args.seed,
            device="cpu",
            max_input_side=args.max_side,
            settings=replace(FinetuneSettings(), planes="all"),
        )
        done = [e for e in run(job) if isinstance(e, Done)][-1]
        network = network_probabilities(load_checkpoint(done.checkpoint), case.image)
        array = case.image.array
        normalised = fit_intensity(array, NormalizationConfig.for_modality(case.image.modality))(
            array
        )
        prior = FeaturePrior(
            normalised, partial, 0, np.array(labelled), len(case.class_names), seed=args.seed
        ).probabilities
        for w in WEIGHTS:
            pred = ((1 - w) * network + w * prior).argmax(dim=0).numpy().astype(np.uint8)
            row = {
                "case": name,
                "k": int(k_text),
                "seed": args.seed,
                "steps": args.steps,
                "max_side": args.max_side,
                "prior_weight": w,
                **score(pred, case.truth, labelled, case.class_names),
                "cpu": cpu_model(),
            }
            _append(args.results, row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
