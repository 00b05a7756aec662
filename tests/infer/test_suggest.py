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
from napari_fewlabel.infer.suggest import distance_weight, stream_disagreement, suggest_slices
from napari_fewlabel.io import save_labels
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import save_checkpoint


def _volume(shape=(6, 32, 32), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume.from_array(rng.gamma(2, 50, size=shape).astype(np.float32), modality="MR")


def _by_hand(model, volume: Volume) -> tuple[list[int], list[int]]:
    """Slice by slice, by hand: the 3-slice window (edges repeated), both streams' argmax;
    voxels they label differently, and voxels both call a structure."""
    mapping = normalization.fit_intensity(volume.array, model.card.normalization)
    n = volume.shape[0]
    differ, both = [], []
    for z in range(n):
        window = np.clip([z - 1, z, z + 1], 0, n - 1)
        x = torch.from_numpy(mapping(volume.array[window]))[None]
        with torch.no_grad():
            a, b = (logits.argmax(1) for logits in model.network(x))
        differ.append(int((a != b).sum()))
        both.append(int(((a > 0) & (b > 0)).sum()))
    return differ, both


def test_each_slice_counts_the_voxels_the_two_streams_label_differently(model):
    volume = _volume()
    disagreement, foreground, agreed = stream_disagreement(
        model, volume, device="cpu", batch_size=4
    )
    differ, both = _by_hand(model, volume)
    assert disagreement.tolist() == differ
    assert agreed.tolist() == both
    assert disagreement.max() > 0  # a random network's two decoders do disagree
    assert (agreed <= foreground).all() and (foreground <= 32 * 32).all()


def test_distance_weight_favours_slices_far_from_the_labels():
    w = distance_weight(40, [10])  # r = 40 / 20 = 2
    assert w[10] == 0
    assert w[11] == pytest.approx(1 / 3) and w[9] == pytest.approx(1 / 3)
    assert w[30] == pytest.approx(20 / 22)
    assert np.all(np.diff(w[10:]) > 0) and np.all(np.diff(w[:11]) < 0)
    assert distance_weight(5, []).tolist() == [1.0] * 5


def test_suggestions_leave_out_labelled_slices_and_come_best_first(model):
    volume = _volume()
    picks = suggest_slices(model, volume, n=10, exclude=[1, 3], device="cpu")
    assert [p.index for p in picks if p.index in (1, 3)] == []
    assert len(picks) == 4  # six slices, two labelled
    differ, both = _by_hand(model, volume)
    weight = distance_weight(6, [1, 3])
    assert all(p.disagreement == differ[p.index] for p in picks)
    assert all(p.score == pytest.approx(differ[p.index] * weight[p.index]) for p in picks)
    # Slices where both streams see a structure come first, each group best score first.
    groups = [both[p.index] == 0 for p in picks]
    assert groups == sorted(groups)
    for group in (False, True):
        scores = [p.score for p, g in zip(picks, groups, strict=True) if g == group]
        assert scores == sorted(scores, reverse=True)
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
