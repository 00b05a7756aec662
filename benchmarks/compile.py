"""Does ``torch.compile`` pay for the fine-tuning step and for prediction? (issue 25)

    python benchmarks/compile.py > benchmarks/results/compile_cpu.json   # ~5 min, 2 CPU cores

The package's network (default size, 8 slices of 256x256, 3 input slices, 4
classes) placed as the package places it (channels-last and bfloat16 autocast
where the CPU has it; train/device.py), eager against ``torch.compile`` (the
inductor backend, default mode), in the same process, interleaved, median of
``--repeats``. Reported: the seconds of the first compiled call (compilation
included, what a user waits once per run), steady-state rates, their ratio,
and how many steps a run needs before compiling has paid for itself.

It also measures what preparing batches ahead, off the training thread,
could save at most: the seconds per default step spent drawing the slices
(``TrainingBatches`` gathers from tensors fitted once) and augmenting them
(geometry warp, intensity jitter, strong view for 4 labelled + 4 unlabelled
slices), as a share of the eager training step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from napari_fewlabel.data.augment import (
    AugmentConfig,
    jitter_intensity,
    random_geometry,
    strong_view,
    warp,
)
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.device import (
    autocast,
    describe_device,
    place_network,
    precision_for,
    resolve_device,
)

SIZE, CLASSES, BATCH = 256, 4, 8


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = precision_for(device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    aug = AugmentConfig()
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), device=device)
    xa, ya = warp(x, y, random_geometry(BATCH, aug, generator, device))

    nets = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        net = place_network(TwoStreamUNet(UNetConfig(3, CLASSES)), device)
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        nets[name] = (net, torch.compile(net) if name == "compiled" else net, opt)

    def train_step(name: str) -> None:
        _, run, opt = nets[name]
        with autocast(device, precision):
            a, b = run(xa)
            loss = dice_ce_loss(a, ya)[0] + dice_ce_loss(b, ya)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def predict(name: str) -> None:
        _, run, _ = nets[name]
        with torch.inference_mode(), autocast(device, precision):
            run(x)

    def augment() -> None:
        # The default step's preparation: 4 labelled + 4 unlabelled slices (gathered, warped,
        # jittered; the unlabelled ones also get the strong view).
        index = torch.randint(0, BATCH, (BATCH,), generator=generator)
        xb, yb = x[index], y[index]
        xl, _ = warp(xb[:4], yb[:4], random_geometry(4, aug, generator, device))
        jitter_intensity(xl, generator, contrast=0.15, brightness=0.1, noise_std=0.05)
        xu, _ = warp(xb[4:], None, random_geometry(4, aug, generator, device))
        weak = jitter_intensity(xu, generator, contrast=0.15, brightness=0.1, noise_std=0.05)
        strong_view(weak, aug, generator)

    first = {}
    for what, fn in (("train", train_step), ("predict", predict)):
        for name in ("eager", "compiled"):
            first[f"{what}[{name}]"] = _timed(lambda fn=fn, name=name: fn(name), device)
    # A second call: torch.compile may recompile once (e.g. for grad mode changes).
    for fn in (train_step, predict):
        for name in ("eager", "compiled"):
            _timed(lambda fn=fn, name=name: fn(name), device)
    times: dict[str, list[float]] = {k: [] for k in first}
    for _ in range(args.repeats):
        for what, fn in (("train", train_step), ("predict", predict)):
            for name in ("eager", "compiled"):
                times[f"{what}[{name}]"].append(_timed(lambda fn=fn, name=name: fn(name), device))
    prep = [_timed(augment, device) for _ in range(args.repeats)]
    median = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "device": describe_device(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision.name,
        "input": f"{BATCH} x 3 x {SIZE} x {SIZE}",
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "median_s": {k: round(v, 4) for k, v in median.items()},
    }
    for what in ("train", "predict"):
        eager, compiled = median[f"{what}[eager]"], median[f"{what}[compiled]"]
        result[f"{what}_speedup_compiled_vs_eager"] = round(eager / compiled, 3)
        saved = eager - compiled
        overhead = first[f"{what}[compiled]"] - first[f"{what}[eager]"]
        result[f"{what}_calls_to_pay_back_compilation"] = (
            round(overhead / saved) if saved > 0 else None
        )
    result["batch_preparation_s"] = round(statistics.median(prep), 4)
    result["batch_preparation_share_of_eager_step"] = round(
        statistics.median(prep) / median["train[eager]"], 3
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
