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


def test_cpu_precision_follows_the_cpu_and_the_override(monkeypatch):
    """bfloat16 on a CPU with AMX or AVX-512 BF16, float32 elsewhere; FEWLABEL_CPU_BF16 wins."""
    from napari_fewlabel.train import device as device_module

    cpu = torch.device("cpu")
    monkeypatch.delenv("FEWLABEL_CPU_BF16", raising=False)
    flags = device_module._cpu_flags()
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert precision_for(cpu).name == ("bfloat16" if native else "float32")
    monkeypatch.setenv("FEWLABEL_CPU_BF16", "0")
    precision = precision_for(cpu)
    assert precision.dtype is None and precision.name == "float32"
    with autocast(cpu, precision):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setenv("FEWLABEL_CPU_BF16", "1")
    precision = precision_for(cpu)
    assert precision.dtype is torch.bfloat16 and not precision.needs_grad_scaler
    with autocast(cpu, precision):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert describe_device(cpu).startswith("cpu (")
    assert memory_mb(cpu) > 10  # peak resident memory of this process, MiB


def test_networks_sit_channels_last_on_the_cpu_and_save_in_the_usual_layout(tmp_path):
    from napari_fewlabel.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_fewlabel.train.device import place_network
    from tiny_model import make_model

    model = make_model()
    network = place_network(model.network, torch.device("cpu"))
    weight = network.encoder.stem[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    path = save_checkpoint(tmp_path / "m.safetensors", network, model.card)
    loaded = load_checkpoint(path).network
    assert torch.equal(loaded.encoder.stem[0].weight, weight)


def test_group_norm_trains_in_float32_under_cpu_bfloat16():
    """The slow bfloat16 kernel is avoided in training (normalised in float32, handed on in
    bfloat16); the output is float32's, rounded."""
    from napari_fewlabel.models.unet2d import GroupNorm

    norm = GroupNorm(4, 8)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = norm(x.bfloat16())
        with torch.no_grad():
            predicted = norm(x.bfloat16())
    assert trained.dtype == torch.bfloat16 and predicted.dtype == torch.bfloat16
    # The backward runs through the float32 group norm kernel.
    assert trained.grad_fn is not None
    assert "GroupNorm" in trained.grad_fn.next_functions[0][0].name()
    reference = torch.nn.functional.group_norm(x.bfloat16().float(), 4, norm.weight, norm.bias)
    assert torch.equal(trained, reference.bfloat16())
    assert torch.allclose(predicted.float(), reference, atol=0.05)
    trained.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_mixed_precision():
    device = resolve_device("cuda")
    assert precision_for(device).dtype in (torch.bfloat16, torch.float16)
    assert "GB" in describe_device(device)
