from __future__ import annotations

import pytest
import torch

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.train.device import (
    autocast,
    describe_device,
    memory_mb,
    precision_for,
    resolve_device,
)


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        assert auto.type == "mps"
    else:
        assert auto.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_cuda_is_a_user_error_with_advice():
    with pytest.raises(FewLabelError, match="--device cpu"):
        resolve_device("cuda")


def test_unknown_device_is_a_user_error():
    with pytest.raises(FewLabelError, match="Unknown device"):
        resolve_device("tpu9")


def test_cpu_trains_in_float32_and_reports_memory():
    cpu = torch.device("cpu")
    precision = precision_for(cpu)
    assert precision.dtype is None and precision.name == "float32"
    with autocast(cpu, precision):
        assert torch.ones(2).dtype == torch.float32
    assert describe_device(cpu).startswith("cpu (")
    assert memory_mb(cpu) > 10  # peak resident memory of this process, MiB


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_mixed_precision():
    device = resolve_device("cuda")
    assert precision_for(device).dtype in (torch.bfloat16, torch.float16)
    assert "GB" in describe_device(device)
