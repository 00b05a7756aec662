"""ONNX Runtime against eager torch for CPU prediction of the default network (issue 25).

The network's ``predict_proba`` (both streams' softmax, averaged) is exported
to ONNX (opset 17, TorchScript exporter) and run with ONNX Runtime's CPU
provider in float32. It is timed, in the same process and interleaved, against
eager torch in float32 (default layout, and channels-last) and against the
product's setup (``train/device.py``: channels-last, bfloat16 autocast where the
CPU has it). Agreement: the share of pixels whose argmax matches float32 torch,
and the largest difference of a probability. Prints JSON.

    pip install onnx onnxruntime onnxscript     # not dependencies of the package
    python benchmarks/onnx_runtime.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_fewlabel.models.unet2d import TwoStreamUNet, UNetConfig
from napari_fewlabel.train.device import autocast, place_network, precision_for


class _Probabilities(torch.nn.Module):
    def __init__(self, network: TwoStreamUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.predict_proba(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    config = UNetConfig(3, 4)
    plain = TwoStreamUNet(config).eval()
    product = place_network(TwoStreamUNet(config).eval(), cpu)
    product.load_state_dict(plain.state_dict())
    fp32_cl = place_network(TwoStreamUNet(config).eval(), cpu)
    fp32_cl.load_state_dict(plain.state_dict())
    x = torch.randn(args.batch, 3, args.size, args.size)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        began = time.perf_counter()
        torch.onnx.export(
            _Probabilities(plain),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["p"],
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
            opset_version=17,
            dynamo=False,
        )
        export_s = time.perf_counter() - began
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    precision = precision_for(cpu)
    x_numpy = x.numpy()

    def product_run() -> np.ndarray:
        with torch.inference_mode(), autocast(cpu, precision):
            return product.predict_proba(x).float().numpy()

    def torch_run(network: TwoStreamUNet) -> np.ndarray:
        with torch.inference_mode():
            return network.predict_proba(x).numpy()

    runs: dict[str, Any] = {
        "onnxruntime_fp32": lambda: session.run(None, {"x": x_numpy})[0],
        "torch_fp32": lambda: torch_run(plain),
        "torch_fp32_channels_last": lambda: torch_run(fp32_cl),
        f"torch_product_{precision.name}_channels_last": product_run,
    }
    outputs = {name: np.asarray(run()) for name, run in runs.items()}
    reference = outputs["torch_fp32"]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "input": f"{args.batch} x 3 x {args.size} x {args.size}",
                "threads": args.threads,
                "onnxruntime": ort.__version__,
                "torch": torch.__version__,
                "export_seconds": round(export_s, 1),
                "slices_per_s": {k: round(v, 2) for k, v in rate.items()},
                "argmax_agreement_with_torch_fp32": {
                    k: round(float((o.argmax(1) == reference.argmax(1)).mean()), 5)
                    for k, o in outputs.items()
                },
                "max_abs_difference": {
                    k: float(np.abs(o - reference).max()) for k, o in outputs.items()
                },
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
