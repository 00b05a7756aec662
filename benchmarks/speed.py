"""Speed and memory of the engine on the CPU (or a GPU), against a MONAI UNet of the same size.

Prints one JSON document:

* ``training``: steps/s of our fine-tuning step (two streams; supervised-only
  and the default step with cross pseudo-supervision) and of a MONAI ``UNet``
  with the same parameter count (2.5 M), each on 8 slices of 256x256, with
  the ratio ours / MONAI (same process, interleaved, median of repeats);
* ``inference``: slices/s of both networks' forward pass (+ softmax) on 16
  slices of 256x256, and of ``predict_volume`` on a 256x256x200 volume;
* ``memory``: peak resident memory when predicting the lung1 chest CT
  (512x512x48, pyradiomics test data) and 512x512x300 and x600 CT volumes, each in a
  fresh process, as extra memory over the process before the volume was read,
  relative to the volume's own size;
* ``default_finetune``: wall time of a default fine-tuning run on a synthetic
  256x256x200 MRI (skip with ``--skip-finetune``).

    python benchmarks/speed.py > speed.json
    python benchmarks/speed.py --speed-only          # the rates only, a few minutes
    python benchmarks/speed.py --device cuda > speed_gpu.json    # on a GPU machine

On a GPU both networks run under the product's mixed precision
(``train/device.py``: bfloat16 autocast where supported), timed with the
device synchronised, and ``memory`` (host memory of CPU prediction) is left out.

lung1 comes from the pyradiomics 3.0.1 source archive (see DATA.md); pass
its path with ``--lung1`` (default: where ``scripts/fetch_test_data.sh`` puts it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_fewlabel.data.augment import (
    AugmentConfig,
    jitter_intensity,
    random_geometry,
    strong_view,
    warp,
)
from napari_fewlabel.data.classes import default_classes
from napari_fewlabel.data.normalization import NormalizationConfig
from napari_fewlabel.losses.cross_pseudo_supervision import cross_pseudo_supervision_loss
from napari_fewlabel.losses.dice_ce import dice_ce_loss
from napari_fewlabel.models.checkpoint import ModelCard, SegmentationModel
from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.device import (
    Precision,
    autocast,
    describe_device,
    place_network,
    precision_for,
    resolve_device,
)

SIZE = 256
CLASSES = 4


def _monai_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(2, 3, CLASSES, (20, 40, 80, 160, 320), (2, 2, 2, 2), num_res_units=2)


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


FP32 = Precision(None, False)


def _timed(fn: Any, device: torch.device, precision: Precision) -> float:
    """Seconds of one call of ``fn`` under ``precision``, the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with autocast(device, precision):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _setups(device: torch.device) -> dict[str, tuple[bool, Precision]]:
    """How each network runs: (channels-last layout, precision).

    ``product``: as the package runs it on ``device`` (train/device.py);
    ``plain``: float32 in the default layout (ours before issue 25, and MONAI
    as a user runs it without tuning).
    """
    return {"product": (device.type == "cpu", precision_for(device)), "plain": (False, FP32)}


def _placed(network: torch.nn.Module, device: torch.device, channels_last: bool) -> Any:
    """As the package places it (channels_last on the CPU), or plainly moved to ``device``."""
    return place_network(network, device) if channels_last else network.to(device)


def matmul_flops(device: torch.device, precision: Precision, size: int = 2048) -> float:
    """Dense matmul FLOP/s of this machine at ``precision`` (median of 5), the peak to compare with."""
    dtype = precision.dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = [_timed(lambda: a @ b, device, FP32) for _ in range(5)]
    return 2 * size**3 / statistics.median(times)


def _step_flops(step: Any, device: torch.device, precision: Precision) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, autocast(device, precision):
        step()
    return int(counter.get_total_flops())


def training_speed(repeats: int, device: torch.device) -> dict[str, Any]:
    """Steps/s of ours (supervised and default step) and MONAI, in each setup, interleaved."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    aug = AugmentConfig()
    x = torch.randn(8, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, CLASSES, (8, SIZE, SIZE), device=device)

    def ours_supervised(net: TwoStreamUNet, opt: torch.optim.Optimizer) -> None:
        xa, ya = warp(x, y, random_geometry(8, aug, generator, device))
        a, b = net(xa)
        loss = dice_ce_loss(a, ya)[0] + dice_ce_loss(b, ya)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def ours_default(net: TwoStreamUNet, opt: torch.optim.Optimizer) -> None:
        # The default fine-tuning step: 4 labelled + 4 unlabelled slices, teacher pass on the weak view.
        xa, ya = warp(x, y, random_geometry(8, aug, generator, device))
        weak = jitter_intensity(xa[4:], generator, contrast=0.15, brightness=0.1, noise_std=0.05)
        with torch.no_grad():
            ta, tb = net(weak)
        a, b = net(torch.cat([xa[:4], strong_view(weak, aug, generator)]))
        loss = dice_ce_loss(a[:4], ya[:4])[0] + dice_ce_loss(b[:4], ya[:4])[0]
        loss = (
            loss
            + cross_pseudo_supervision_loss(
                a[4:], b[4:], teacher_1=ta, teacher_2=tb, threshold=0.9
            )[0]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    def monai_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        xa, ya = warp(x, y, random_geometry(8, aug, generator, device))
        loss = dice_ce_loss(net(xa), ya)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    steps: dict[str, tuple[Any, Precision]] = {}
    params = {}
    for setup, (channels_last, precision) in _setups(device).items():
        for name, make, fn in (
            ("ours_supervised", lambda: TwoStreamUNet(UNetConfig(3, CLASSES)), ours_supervised),
            ("ours_default", lambda: TwoStreamUNet(UNetConfig(3, CLASSES)), ours_default),
            ("monai", _monai_unet, monai_step),
        ):
            net = _placed(make(), device, channels_last)
            params[name.split("_")[0]] = _params(net)
            opt = torch.optim.AdamW(net.parameters(), 1e-3)
            steps[f"{name}[{setup}]"] = (
                lambda fn=fn, net=net, opt=opt: fn(net, opt),
                precision,
            )
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn, precision in steps.values():  # warm-up
        _timed(fn, device, precision)
    for _ in range(repeats):  # interleaved so machine load hits all alike
        for name, (fn, precision) in steps.items():
            times[name].append(_timed(fn, device, precision))
    rate = {k: 1 / statistics.median(v) for k, v in times.items()}
    product = _setups(device)["product"][1]
    flops = _step_flops(steps["ours_supervised[product]"][0], device, product)
    peak = {"fp32": matmul_flops(device, FP32)}
    if product.dtype is not None:
        peak[product.name] = matmul_flops(device, product)
    achieved = flops * rate["ours_supervised[product]"]
    return {
        "input": f"8 x 3 x {SIZE} x {SIZE}",
        "params_ours": params["ours"],
        "params_monai": params["monai"],
        "setups": {
            k: {"channels_last": c, "precision": p.name} for k, (c, p) in _setups(device).items()
        },
        "steps_per_s": {k: round(v, 3) for k, v in rate.items()},
        "ratio_ours_supervised_vs_monai_plain": round(
            rate["ours_supervised[product]"] / rate["monai[plain]"], 3
        ),
        "ratio_ours_default_vs_monai_plain": round(
            rate["ours_default[product]"] / rate["monai[plain]"], 3
        ),
        "ratio_ours_supervised_vs_monai_same_setup": round(
            rate["ours_supervised[product]"] / rate["monai[product]"], 3
        ),
        "ratio_ours_default_vs_monai_same_setup": round(
            rate["ours_default[product]"] / rate["monai[product]"], 3
        ),
        "speedup_ours_default_product_vs_plain": round(
            rate["ours_default[product]"] / rate["ours_default[plain]"], 3
        ),
        "supervised_step_gflop": round(flops / 1e9, 2),
        "achieved_gflop_per_s": round(achieved / 1e9, 1),
        "matmul_gflop_per_s": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "share_of_fp32_matmul": round(achieved / peak["fp32"], 3),
    }


@torch.no_grad()
def inference_speed(repeats: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, SIZE, SIZE, device=device)
    fns: dict[str, tuple[Any, Precision]] = {}
    for setup, (channels_last, precision) in _setups(device).items():
        ours = _placed(TwoStreamUNet(UNetConfig(3, CLASSES)).eval(), device, channels_last)
        monai = _placed(_monai_unet().eval(), device, channels_last)
        fns[f"ours[{setup}]"] = (lambda ours=ours: ours.predict_proba(x), precision)
        fns[f"monai[{setup}]"] = (lambda monai=monai: monai(x).float().softmax(1), precision)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn, precision in fns.values():
        _timed(fn, device, precision)
    for _ in range(repeats):
        for name, (fn, precision) in fns.items():
            times[name].append(_timed(fn, device, precision))
    rate = {k: 16 / statistics.median(v) for k, v in times.items()}

    from napari_fewlabel.infer.predict import predict_volume
    from napari_fewlabel.io.volume import Volume

    model = _model("MR")
    rng = np.random.default_rng(0)
    volume = Volume.from_array(
        rng.gamma(2, 100, size=(200, SIZE, SIZE)).astype(np.float32), modality="MR"
    )
    t0 = time.perf_counter()
    predict_volume(model, volume, device=device)
    whole = time.perf_counter() - t0
    return {
        "input": f"16 x 3 x {SIZE} x {SIZE}",
        "slices_per_s": {k: round(v, 2) for k, v in rate.items()},
        "ratio_ours_vs_monai_plain": round(rate["ours[product]"] / rate["monai[plain]"], 3),
        "ratio_ours_vs_monai_same_setup": round(rate["ours[product]"] / rate["monai[product]"], 3),
        "speedup_ours_product_vs_plain": round(rate["ours[product]"] / rate["ours[plain]"], 3),
        "predict_volume_256x256x200_s": round(whole, 1),
        "predict_volume_slices_per_s": round(200 / whole, 2),
    }


def _model(
    modality: str, network: TwoStreamUNet | None = None, planes: int = 1
) -> SegmentationModel:
    """A random model; ``planes=3`` predicts as the default engine does (three planes averaged)."""
    config = UNetConfig(3, CLASSES)
    card = ModelCard(
        architecture=config.to_dict(),
        classes=default_classes(CLASSES),
        modality=modality,  # type: ignore[arg-type]
        normalization=NormalizationConfig.for_modality(modality),  # type: ignore[arg-type]
        input_size=(SIZE, SIZE),
        inference={"planes": [0, 1, 2][:planes], "plane_max_side": SIZE},
    )
    return SegmentationModel((network or TwoStreamUNet(config)).eval(), card)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc (VmRSS: now, VmHWM: peak), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def memory_child(path: str, planes: int) -> None:
    """Run in a fresh process: load a model, then a volume, predict; report memory in MiB."""
    from napari_fewlabel.infer.predict import predict_volume
    from napari_fewlabel.io.volume import Volume

    model = _model("CT", planes=planes)
    before = _rss_mb()
    if path.endswith(".npy"):
        array = np.load(path)
        spacing = (1.0, 0.7, 0.7)
    else:
        import SimpleITK as sitk

        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)  # (z, y, x), LPS with an identity direction
        spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    volume = Volume.from_array(array, spacing, modality="CT")  # type: ignore[arg-type]
    after_read = _rss_mb()
    t0 = time.perf_counter()
    labels = predict_volume(model, volume, device="cpu")
    seconds = time.perf_counter() - t0
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would report the parent's peak.
    peak = _status_mb("VmHWM")
    print(
        json.dumps(
            {
                "shape_zyx": list(volume.shape),
                "planes": planes,
                "dtype": str(array.dtype),
                "volume_mb": round(array.nbytes / 2**20, 1),
                "labels_mb": round(labels.nbytes / 2**20, 1),
                "rss_before_volume_mb": round(before, 1),
                "rss_after_read_mb": round(after_read, 1),
                "peak_rss_mb": round(peak, 1),
                "peak_over_baseline_mb": round(peak - before, 1),
                "peak_over_baseline_vs_volume": round((peak - before) / (array.nbytes / 2**20), 2),
                "predict_seconds": round(seconds, 1),
            }
        )
    )


def memory(lung1: Path, planes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cases: dict[str, str] = {}
    if lung1.is_file():
        cases["lung1_512x512x48"] = str(lung1)
    else:
        out["lung1_512x512x48"] = f"skipped: {lung1} not found (see DATA.md to get it)"
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        # Body-like HU values: air outside a disc, soft tissue and noise inside.
        yy, xx = np.mgrid[:512, :512]
        body = ((yy - 256) ** 2 + (xx - 256) ** 2) < 230**2
        slab = np.where(body, 40, -1000).astype(np.int16)
        for slices in (300, 600):
            path = Path(tmp) / f"ct_512x512x{slices}.npy"
            volume = np.empty((slices, 512, 512), dtype=np.int16)
            for z in range(slices):
                volume[z] = slab + rng.integers(-30, 30, size=(512, 512), dtype=np.int16)
            np.save(path, volume)
            del volume
            cases[f"synthetic_ct_512x512x{slices}"] = str(path)
        for name, path in cases.items():
            result = subprocess.run(
                [sys.executable, __file__, "--memory-child", path, "--planes", str(planes)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def default_finetune(device: torch.device) -> dict[str, Any]:
    from napari_fewlabel.data.phantoms import cardiac_phantom
    from napari_fewlabel.train.events import Done
    from napari_fewlabel.train.finetune import FinetuneJob, run

    phantom = cardiac_phantom("MR", seed=0, shape=(200, 256, 256), spacing_mm=(0.5, 0.75, 0.75))
    truth = phantom.labels.array
    painted = np.zeros_like(truth)
    painted[[70, 130]] = truth[[70, 130]]
    with tempfile.TemporaryDirectory() as tmp:
        job = FinetuneJob(
            phantom.image,
            painted,
            Path(tmp) / "m.safetensors",
            classes=phantom.classes,
            device=str(device),
        )
        t0 = time.perf_counter()
        done = [e for e in run(job) if isinstance(e, Done)][-1]
        seconds = time.perf_counter() - t0
    return {
        "volume": "synthetic MRI phantom 256x256x200, 2 labelled slices",
        "steps": done.summary["steps_done"],
        "wall_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / done.summary["steps_done"], 3),
    }


def default_run_mri(device: torch.device, case_file: Path | None) -> dict[str, Any]:
    """The default run a user starts on a brain MRI: 3 painted axial slices, train + predict.

    The scan is the MNI152 2009 T1 at 1 mm (197x233x189, a little larger than a
    181x217x181 brain MRI), grey and white matter painted on 3 evenly spread
    axial slices (``annotation_efficiency.mni_volume``); ``case_file`` is that
    case saved by ``fewslice_cases.write_case``, for a machine without nilearn.
    """
    from annotation_efficiency import evenly_spread
    from fewslice_cases import Case, read_case, write_case
    from fewslice_suite import score

    from napari_fewlabel.data.classes import named_classes
    from napari_fewlabel.infer.predict import predict_volume
    from napari_fewlabel.models.checkpoint import load_checkpoint, read_card
    from napari_fewlabel.train.events import Done
    from napari_fewlabel.train.finetune import FinetuneJob, run

    if case_file is not None and case_file.is_file():
        case = read_case(case_file)
    else:
        from annotation_efficiency import CLASS_NAMES, mni_volume

        image, truth = mni_volume(1)
        case = Case("mni-1mm-gm-wm", image, truth, CLASS_NAMES, "MNI152 2009 T1, 1 mm")
        if case_file is not None:
            write_case(case, case_file)
    labelled = evenly_spread(case.truth, 3)
    painted = np.zeros_like(case.truth)
    painted[labelled] = case.truth[labelled]
    with tempfile.TemporaryDirectory() as tmp:
        job = FinetuneJob(
            case.image,
            painted,
            Path(tmp) / "m.safetensors",
            classes=named_classes(case.class_names),
            device=str(device),
        )
        t0 = time.perf_counter()
        done = [e for e in run(job) if isinstance(e, Done)][-1]
        trained = time.perf_counter()
        model = load_checkpoint(done.checkpoint)
        prediction = predict_volume(model, case.image, device=str(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        inference = read_card(done.checkpoint).inference
    return {
        "volume": f"MNI152 T1 {'x'.join(map(str, case.image.shape[::-1]))} (x, y, z), "
        "GM/WM painted on 3 axial slices",
        "steps": done.summary["steps_done"],
        "planes": inference.get("planes"),
        "train_seconds": round(trained - t0, 1),
        "predict_seconds": round(finished - trained, 1),
        "wall_seconds": round(finished - t0, 1),
        "mean_dice_unlabelled": round(
            score(prediction, case.truth, labelled, case.class_names)["mean_dice"], 3
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--lung1",
        type=Path,
        default=Path.home() / ".cache/napari-fewlabel/test-data/pyradiomics/lung1_image.nrrd",
    )
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument(
        "--mri-case",
        type=Path,
        help="the 1 mm MNI case as fewslice_cases.write_case saved it (read if there, else written)",
    )
    parser.add_argument(
        "--mri-only", action="store_true", help="only the default run on the 1 mm brain MRI"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--planes",
        type=int,
        choices=(1, 3),
        default=3,
        help="planes the memory cases predict along (3: the default engine; 1: before 2026-12)",
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory cases (CPU prediction)"
    )
    parser.add_argument(
        "--speed-only", action="store_true", help="only the training and inference rates"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.planes)
        return
    if args.memory_only:
        print(json.dumps({"memory": memory(args.lung1, args.planes)}, indent=1))
        return
    device = resolve_device(args.device)
    if args.mri_only:
        print(json.dumps({"default_run_mri": default_run_mri(device, args.mri_case)}, indent=1))
        return
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "device": describe_device(device),
        "precision": precision_for(device).name,
        "date": time.strftime("%Y-%m-%d"),
        "training": training_speed(args.repeats, device),
        "inference": inference_speed(args.repeats, device),
    }
    if args.speed_only:
        print(json.dumps(report, indent=1))
        return
    if device.type == "cpu":
        report["memory"] = memory(args.lung1, args.planes)
    if not args.skip_finetune:
        report["default_finetune"] = default_finetune(device)
        report["default_run_mri"] = default_run_mri(device, args.mri_case)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
