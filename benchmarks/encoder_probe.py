"""Linear probe: what an encoder's features alone say about a structure, before fine-tuning.

    python benchmarks/encoder_probe.py --volume brain-tumour \
        --encoders DIR/ideal-encoder-without-brain1.safetensors --init-seeds 0 1 2 3 4

Fine-tuning from one or two labelled slices is noisy (one seed in three decides a
mean in docs/benchmarks.md#pretraining), so whether a start *helps* is hard to
see through it. This asks the question without training the network: every
encoder level of a slice is upsampled to full resolution and concatenated (the
hypercolumn, ``models/heads.py``), and one linear classifier per start is fitted
on the pixels of the given slices (the k painted slices and, with
``--mark-empty``, the two slices marked empty, as in ``benchmarks/pretraining.py``).
Its tumour Dice on every other slice measures how linearly the frozen features
separate the structure. The probe is deterministic for a given encoder, so a
pretrained encoder is one number and random initialisation a spread over
``--init-seeds``.

The classifier: features standardised on the training pixels; multinomial
logistic regression, full-batch L-BFGS, a small L2 penalty (``--l2``); each
class weighted by the inverse of its share of the training pixels (a lesion is
about 1 % of a slice; unweighted, the probe says "background" everywhere); every
foreground pixel of the given slices and up to ``--background-pixels`` background
pixels per slice, drawn with a fixed seed. Slices are normalised and fitted to
the input size exactly as fine-tuning does (``data/slice_stack.py``).

One JSON row per start and k goes to ``--results`` (JSON lines; rows already
there are skipped) and the whole table to stdout. About 6 s per start for the
brain tumour and 30-50 s for the lung CT on one CPU thread (AMD EPYC).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from annotation_efficiency import dice_on_unlabelled, evenly_spread
from pretraining import (
    TARGET_SCANS,
    VOLUMES,
    _append,
    check_not_pretrained_on,
    cpu_model,
    empty_either_side,
    evaluation_volume,
    foreground_on_empty_slices,
)

from napari_fewlabel.data.input_fit import choose_input_size
from napari_fewlabel.data.normalization import NormalizationConfig, fit_intensity
from napari_fewlabel.data.slice_stack import SliceStack, fit_labels
from napari_fewlabel.models.checkpoint import load_encoder_weights, read_card
from napari_fewlabel.models.heads import hypercolumn
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig

#: Every encoder level, full resolution first: what the decoders can draw on.
ALL_LEVELS = (0, 1, 2, 3, 4, 5)


def encoder_network(encoder: Path | None, num_classes: int, seed: int) -> TwoStreamUNet:
    """The fine-tuning network of a start: a random one (``seed``) or one with ``encoder`` loaded.

    The random draw is the one fine-tuning makes with the same seed
    (``torch.manual_seed`` then the network), so a random start here is the
    network a random-init fine-tuning run of that seed begins from.
    """
    torch.manual_seed(seed)
    config = UNetConfig(num_classes=num_classes)
    if encoder is not None:  # as fine-tuning does: the card's network, this target's classes
        config = replace(
            UNetConfig.from_dict(read_card(encoder).architecture), num_classes=num_classes
        )
    network = TwoStreamUNet(config)
    if encoder is not None:
        load_encoder_weights(network, encoder)
    return network.eval()


@torch.no_grad()
def slice_features(network: TwoStreamUNet, stack: SliceStack, index: int) -> torch.Tensor:
    """The hypercolumn of one slice at the input size, ``(C, H, W)``."""
    x = stack.windows(torch.tensor([index]), network.encoder.stem[0].in_channels)
    return hypercolumn(network.encoder(x), ALL_LEVELS)[0]


def training_pixels(
    network: TwoStreamUNet,
    stack: SliceStack,
    labels: dict[int, torch.Tensor],
    background_pixels: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, C)`` and classes ``(N,)`` of the pixels the probe learns from."""
    xs, ys = [], []
    for z, lab in labels.items():
        feats = slice_features(network, stack, z).flatten(1).T  # (H*W, C)
        flat = lab.flatten()
        fg = torch.nonzero(flat > 0)[:, 0]
        bg = torch.nonzero(flat == 0)[:, 0].numpy()
        if len(bg) > background_pixels:
            bg = rng.choice(bg, background_pixels, replace=False)
        take = torch.cat([fg, torch.from_numpy(np.sort(bg))])
        xs.append(feats[take])
        ys.append(flat[take])
    return torch.cat(xs), torch.cat(ys)


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A class-balanced multinomial logistic regression on standardised features."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), 0.0)
    probe = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), y, weight=weight)
        loss = loss + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe, mean, std


@torch.no_grad()
def predict(
    network: TwoStreamUNet,
    stack: SliceStack,
    probe: torch.nn.Linear,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> np.ndarray:
    """The probe's classes for every slice, at the scan's own resolution ``(z, y, x)``."""
    out = []
    for z in range(len(stack)):
        feats = (slice_features(network, stack, z) - mean[:, None, None]) / std[:, None, None]
        logits = torch.einsum("chw,kc->khw", feats, probe.weight) + probe.bias[:, None, None]
        probs = stack.fit.probabilities_from_input(logits.softmax(0)[None])[0]
        out.append(probs.argmax(0).numpy().astype(np.uint8))
    return np.stack(out)


def probe_row(
    encoder: Path | None,
    seed: int,
    stack: SliceStack,
    truth: np.ndarray,
    labelled: list[int],
    empty: list[int],
    class_names: tuple[str, ...],
    background_pixels: int,
    l2: float,
) -> dict[str, Any]:
    """Fit and score the probe of one start; the measured part of a row."""
    t0 = time.perf_counter()
    network = encoder_network(encoder, len(class_names), seed)
    given = sorted(labelled + empty)
    fitted = fit_labels(truth, 0, np.array(given), stack.fit)
    labels = {z: fitted[n] for n, z in enumerate(given)}
    x, y = training_pixels(network, stack, labels, background_pixels, np.random.default_rng(0))
    probe, mean, std = fit_probe(x, y, len(class_names), l2)
    pred = predict(network, stack, probe, mean, std)
    return {
        "dice": dice_on_unlabelled(pred, truth, given, class_names),
        "foreground_voxels_on_empty_slices": foreground_on_empty_slices(pred, truth, given),
        "training_pixels": len(y),
        "features": int(x.shape[1]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", choices=sorted(VOLUMES), default="brain-tumour")
    parser.add_argument("--encoders", type=Path, nargs="*", default=[])
    parser.add_argument("--init-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mark-empty", action="store_true")
    parser.add_argument("--background-pixels", type=int, default=16384)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).parent / "results/encoder_probe.jsonl"
    )
    args = parser.parse_args()

    image, truth, class_names = evaluation_volume(args.volume)
    if args.volume in TARGET_SCANS:
        for encoder in args.encoders:
            check_not_pretrained_on(encoder, TARGET_SCANS[args.volume])
    normalization = NormalizationConfig.for_modality(image.modality)
    input_size = choose_input_size(truth.shape[1:], multiple=UNetConfig().size_divisor)
    stack = SliceStack(image.array, 0, fit_intensity(image.array, normalization), input_size)
    empty = empty_either_side(truth) if args.mark_empty else []

    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = (
        [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        if args.results.exists()
        else []
    )
    starts: list[tuple[str, Path | None, int]] = [("random init", None, s) for s in args.init_seeds]
    starts += [(p.stem, p, 0) for p in args.encoders]
    rows = []
    for k in args.k:
        labelled = evenly_spread(truth, k)
        for name, encoder, seed in starts:
            key: dict[str, Any] = {
                "volume": args.volume,
                "start": name,
                "k": k,
                "empty_slices": empty,
                "background_pixels": args.background_pixels,
                "l2": args.l2,
            }
            if encoder is None:
                key["init_seed"] = seed
            else:
                key["encoder_steps"] = read_card(encoder).training.get("steps_done")
            old = [r for r in done if all(r.get(f) == v for f, v in key.items())]
            if old:
                rows.append(old[-1])
                continue
            row = {
                **key,
                "labelled_slices": labelled,
                **probe_row(
                    encoder,
                    seed,
                    stack,
                    truth,
                    labelled,
                    empty,
                    class_names,
                    args.background_pixels,
                    args.l2,
                ),
                "cpu": cpu_model(),
                "torch": torch.__version__,
            }
            _append(args.results, row)
            rows.append(row)
    json.dump({"volume": VOLUMES[args.volume], "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
