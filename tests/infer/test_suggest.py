"""'Label next': slices ranked by how much the two streams disagree."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_fewlabel.cli import main
from napari_fewlabel.data import normalization
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.suggest import stream_disagreement, suggest_slices
from napari_fewlabel.io import save_labels
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def _float32(monkeypatch):
    """Float32 on every CPU: the counts are compared exactly with a count by hand in float32."""
    monkeypatch.setenv("FEWLABEL_CPU_BF16", "0")


def _volume(shape=(6, 32, 32), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume.from_array(rng.gamma(2, 50, size=shape).astype(np.float32), modality="MR")


def _expected_disagreement(model, volume: Volume) -> list[int]:
    """Slice by slice, by hand: the 3-slice window (edges repeated), both streams' argmax."""
    mapping = normalization.fit_intensity(volume.array, model.card.normalization)
    n = volume.shape[0]
    out = []
    for z in range(n):
        window = np.clip([z - 1, z, z + 1], 0, n - 1)
        x = torch.from_numpy(mapping(volume.array[window]))[None]
        with torch.no_grad():
            a, b = model.network(x)
        out.append(int((a.argmax(1) != b.argmax(1)).sum()))
    return out


def test_each_slice_counts_the_voxels_the_two_streams_label_differently(model):
    volume = _volume()
    disagreement, foreground = stream_disagreement(model, volume, device="cpu", batch_size=4)
    assert disagreement.tolist() == _expected_disagreement(model, volume)
    assert disagreement.max() > 0  # a random network's two decoders do disagree
    assert (foreground >= 0).all() and (foreground <= 32 * 32).all()


def test_suggestions_leave_out_labelled_slices_and_come_highest_first(model):
    volume = _volume()
    picks = suggest_slices(model, volume, n=10, exclude=[1, 3], device="cpu")
    assert [p.index for p in picks if p.index in (1, 3)] == []
    assert len(picks) == 4  # six slices, two labelled
    scores = [p.disagreement for p in picks]
    assert scores == sorted(scores, reverse=True)
    expected = _expected_disagreement(model, volume)
    assert all(p.disagreement == expected[p.index] for p in picks)
    assert len(suggest_slices(model, volume, n=2, device="cpu")) == 2


def test_the_slice_axis_follows_the_model_card(model_factory):
    model = model_factory(slice_axis=2, input_size=(32, 32))
    volume = _volume(shape=(32, 32, 5))
    picks = suggest_slices(model, volume, n=10, device="cpu")
    assert sorted(p.index for p in picks) == [0, 1, 2, 3, 4]
    assert {p.axis for p in picks} == {2}


def test_bad_requests_are_user_errors(model):
    volume = _volume()
    with pytest.raises(FewLabelError, match="at least one slice"):
        suggest_slices(model, volume, n=0, device="cpu")
    with pytest.raises(FewLabelError, match="outside the scan"):
        suggest_slices(model, volume, exclude=[99], device="cpu")


def test_the_cli_prints_unlabelled_slice_indices(model, tmp_path, capsys):
    volume = _volume()
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.to_file_grid(volume.array), volume.grid.affine), image)
    painted = np.zeros(volume.shape, dtype=np.uint8)
    painted[2, 10:20, 10:20] = 1
    labels = save_labels(painted, like=volume, path=tmp_path / "labels.nii.gz")
    model_path = tmp_path / "model.safetensors"
    save_checkpoint(model_path, model.network, model.card)

    args = ["suggest", str(model_path), str(image), "--labels", str(labels), "--device", "cpu"]
    assert main([*args, "--n", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    indices = [s["index"] for s in report["slices"]]
    assert report["axis"] == 0 and report["excluded"] == [2]
    assert len(indices) == 3 and 2 not in indices and all(0 <= i < 6 for i in indices)

    assert main(args) == 0
    table = capsys.readouterr().out
    assert "along axis 0 (1 labelled left out)" in table
    assert len(table.strip().splitlines()) == 2 + 5

    assert main([*args, "--n", "0"]) == 2
    assert "at least one slice" in capsys.readouterr().err
