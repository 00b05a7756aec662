"""Emphysema subtypes from a few labelled regions: training job, dense map, bad inputs."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_fewlabel.data.emphysema_phantom import EmphysemaPhantom, emphysema_phantom
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.lungs import segment_lungs
from napari_fewlabel.infer.subtypes import load_subtype_model, map_subtypes
from napari_fewlabel.io.volume import Volume
from napari_fewlabel.models.checkpoint import read_card
from napari_fewlabel.models.drasclr import DrasCLRConfig
from napari_fewlabel.train.events import Done, Notice, Progress
from napari_fewlabel.train.subtypes import DEFAULT_STEPS, SubtypeJob, run
from subtype_regions import SUBTYPES, labelled_blobs


@pytest.fixture(scope="module")
def phantom() -> EmphysemaPhantom:
    return emphysema_phantom(0)


def _job(ph: EmphysemaPhantom, painted: np.ndarray, out: Path, **changes) -> SubtypeJob:
    settings = {
        "scans": (ph.scan,),
        "labels": (ph.labels.with_array(painted),),
        "out": out,
        "architecture": DrasCLRConfig(patch_size=12, patch_spacing_mm=2.0),
        "device": "cpu",
        **changes,
    }
    return SubtypeJob(**settings)


@pytest.mark.slow
def test_a_few_labelled_blobs_give_a_subtype_map_with_dice_above_0_7(phantom, tmp_path):
    """The acceptance test of issue #7, with the default settings (about a minute on one core)."""
    truth = phantom.labels.array
    painted = labelled_blobs(truth, phantom.scan.spacing_mm)
    assert 0 < np.count_nonzero(painted) < 0.02 * np.count_nonzero(truth)
    lungs = segment_lungs(phantom.scan)
    events = list(run(_job(phantom, painted, tmp_path / "subtypes.safetensors", lungs=(lungs,))))
    done = events[-1]
    assert isinstance(done, Done) and not done.cancelled
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, DEFAULT_STEPS + 1))

    model = load_subtype_model(done.checkpoint)
    assert model.classes_trained == SUBTYPES
    result = map_subtypes(model, phantom.scan, lungs)
    labels = result.labels
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    assert np.array_equal(labels > 0, lungs.labels > 0)  # the map covers exactly the lungs
    dice = {}
    for c in SUBTYPES:
        a, b = labels == c, truth == c
        dice[c] = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert min(dice.values()) > 0.7, dice
    shares = result.percent()
    assert sum(shares.values()) == pytest.approx(100, abs=0.01)
    print("Dice per subtype:", {c: round(d, 3) for c, d in dice.items()})
    for c, (name, share) in zip(SUBTYPES, shares.items(), strict=True):
        assert share == pytest.approx(100 * np.mean(truth[truth > 0] == c), abs=10), name


def test_job_writes_a_model_with_its_card_and_stops_when_cancelled(phantom, tmp_path):
    truth = phantom.labels.array
    painted = np.where(
        np.isin(truth, (1, 3)), labelled_blobs(truth, phantom.scan.spacing_mm, per_class=2), 0
    )
    tiny = DrasCLRConfig(widths=(4, 4, 8, 16), experts=2, patch_size=8, patch_spacing_mm=4.0)
    events = list(
        run(_job(phantom, painted, tmp_path / "m.safetensors", architecture=tiny, steps=3))
    )
    assert "normal lung" in next(e.message for e in events if isinstance(e, Notice))
    done = events[-1]
    card = read_card(done.checkpoint)
    assert card.architecture["task"] == "emphysema subtypes" and card.modality == "CT"
    assert card.training["classes_trained"] == [1, 3]
    assert [c.name for c in card.classes][1:] == [
        "normal lung",
        "centrilobular",
        "paraseptal",
        "panlobular",
    ]
    model = load_subtype_model(done.checkpoint)
    # Classes nobody labelled are never predicted.
    result = map_subtypes(model, phantom.scan, stride=2)
    assert set(np.unique(result.labels)) <= {0, 1, 3}

    # The GUI's process runner sends the job to a child process and the events back.
    job = _job(phantom, painted, tmp_path / "p.safetensors", architecture=tiny, steps=1)
    assert pickle.loads(pickle.dumps(job)).labels[0].shape == phantom.scan.shape
    assert all(pickle.loads(pickle.dumps(e)) == e for e in events)

    cancel = threading.Event()
    cancel.set()
    events = list(
        run(_job(phantom, painted, tmp_path / "c.safetensors", architecture=tiny, steps=50), cancel)
    )
    assert isinstance(events[-1], Done) and events[-1].cancelled
    assert not any(isinstance(e, Progress) for e in events)


def test_bad_inputs_say_what_to_do(phantom, tmp_path):
    truth = phantom.labels.array
    painted = labelled_blobs(truth, phantom.scan.spacing_mm, per_class=1)
    out = tmp_path / "m.safetensors"
    with pytest.raises(FewLabelError, match="not on the CT's grid"):
        next(run(_job(phantom, painted, out, labels=(Volume.from_array(painted[:, :, :-1]),))))
    with pytest.raises(FewLabelError, match=r"no region.*at least two subtypes"):
        next(run(_job(phantom, np.zeros_like(painted), out)))
    with pytest.raises(FewLabelError, match="only centrilobular"):
        next(run(_job(phantom, np.where(painted == 2, 2, 0), out)))
    with pytest.raises(FewLabelError, match="not subtypes"):
        next(run(_job(phantom, np.where(painted == 2, 7, painted), out)))
    mr = phantom.scan.with_array(np.clip(phantom.scan.array + 1024, 0, None), modality="MR")
    with pytest.raises(FewLabelError):
        next(run(_job(phantom, painted, out, scans=(mr,))))
    with pytest.raises(FewLabelError, match="not an emphysema subtype model"):
        load_subtype_model(_encoder_only_file(tmp_path))


def _encoder_only_file(tmp_path: Path) -> Path:
    from napari_fewlabel.data.classes import default_classes
    from napari_fewlabel.data.normalization import NormalizationConfig
    from napari_fewlabel.models.checkpoint import (
        ENCODER_ONLY_KEY,
        ModelCard,
        save_encoder_checkpoint,
    )
    from napari_fewlabel.models.drasclr import DrasCLREncoder

    config = DrasCLRConfig(widths=(4, 4, 8, 16), experts=2, patch_size=8)
    card = ModelCard(
        architecture={**config.to_dict(), ENCODER_ONLY_KEY: True},
        classes=default_classes(2),
        modality="CT",
        normalization=NormalizationConfig.for_modality("CT"),
        input_size=(8, 8),
    )
    return save_encoder_checkpoint(tmp_path / "enc.safetensors", DrasCLREncoder(config), card)
