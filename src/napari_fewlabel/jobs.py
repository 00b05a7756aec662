"""Whole jobs as one event stream: fine-tune (or adapt) then predict, predict with a
model (one scan, or every open scan), or rank the slices to label next.

The napari widget runs these in a child process and the headless demo runs
them inline; both consume the same events (``train.events`` plus
:class:`SegmentationReady`). Nothing here imports napari or Qt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_fewlabel.data.classes import SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.emphysema import LAA_THRESHOLD_HU, EmphysemaReport, quantify_emphysema
from napari_fewlabel.infer.predict import PredictionStopped, predict_volume_steps
from napari_fewlabel.infer.subtypes import load_subtype_model, map_subtypes
from napari_fewlabel.infer.suggest import SliceScore, suggest_slices
from napari_fewlabel.io import Volume
from napari_fewlabel.models.checkpoint import SegmentationModel, load_checkpoint
from napari_fewlabel.models.registry import resolve_model
from napari_fewlabel.train import adapt, finetune, subtypes
from napari_fewlabel.train.device import resolve_device
from napari_fewlabel.train.events import CancelFlag, Done, Event, Notice

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SegmentationReady:
    """The whole-volume prediction.

    Attributes
    ----------
    labels : ndarray, shape (z, y, x)
        Class indices in the scan's display geometry.
    classes : tuple of SegmentationClass
        Names and colours, from the model card.
    checkpoint : Path
        The model that produced it.
    """

    labels: np.ndarray
    classes: tuple[SegmentationClass, ...]
    checkpoint: Path


@dataclass(frozen=True, eq=False)
class EmphysemaReady:
    """Lung masks, the low-attenuation mask and the scores of a chest CT."""

    report: EmphysemaReport


def measure_emphysema(
    scan: Volume, threshold_hu: float = LAA_THRESHOLD_HU, *, cancel: CancelFlag | None = None
) -> Iterator[Event | EmphysemaReady]:
    """Segment the lungs of a chest CT and score emphysema (one step: no progress to report)."""
    yield Notice("Segmenting the lungs and scoring emphysema...")
    yield EmphysemaReady(quantify_emphysema(scan, threshold_hu=threshold_hu))


@dataclass(frozen=True, eq=False)
class SubtypesReady:
    """The dense emphysema-subtype map of a chest CT and its shares of lung volume."""

    labels: np.ndarray
    percent_of_lung: dict[str, float | None]
    checkpoint: Path


def train_and_map_subtypes(
    job: subtypes.SubtypeJob, scan: Volume, *, cancel: CancelFlag | None = None
) -> Iterator[Event | SubtypesReady]:
    """Train the subtype classifier on ``job``'s labelled regions, then map ``scan``'s lungs.

    Stop keeps the classifier so far and still maps, as fine-tuning does.
    """
    checkpoint = yield from _relay(subtypes.run(job, cancel=cancel))
    if checkpoint is None:
        return
    yield Notice("Mapping the subtypes over the lungs...")
    device = resolve_device(job.device)
    model = load_subtype_model(checkpoint, device=device)
    lungs = job.lungs[0] if job.lungs and scan is job.scans[0] else None
    result = map_subtypes(model, scan, lungs, device=device)
    yield SubtypesReady(result.labels, result.percent(), Path(checkpoint))


def finetune_and_predict(
    job: finetune.FinetuneJob, *, cancel: CancelFlag | None = None
) -> Iterator[Event | PredictionProgress | SegmentationReady]:
    """Fine-tune on ``job`` and predict ``job.image`` with the result.

    A cancelled run still predicts with the weights it saved (that is what
    Stop promises: keep what was learnt so far). Cancelling again during the
    prediction is the runner's business (it ends the process).
    """
    checkpoint = yield from _relay(finetune.run(job, cancel=cancel))
    if checkpoint is None:
        return
    yield Notice("Predicting the whole volume...")
    yield from _predict(checkpoint, job.image, job.device)


def adapt_and_predict(
    job: adapt.AdaptJob, predict_on: Volume, *, cancel: CancelFlag | None = None
) -> Iterator[Event | PredictionProgress | SegmentationReady]:
    """Adapt an MRI model to CT (``job``), then predict the CT ``predict_on`` with it.

    As with fine-tuning, Stop keeps the adapted model so far and still predicts.
    """
    checkpoint = yield from _relay(adapt.run(job, cancel=cancel))
    if checkpoint is None:
        return
    yield Notice("Predicting the CT with the adapted model...")
    yield from _predict(checkpoint, predict_on, job.device)


def predict_with_model(
    model: str | Path, image: Volume, device: str = "auto", *, cancel: CancelFlag | None = None
) -> Iterator[Event | PredictionProgress | SegmentationReady]:
    """Predict ``image`` with a saved model (registry name or path)."""
    yield from _predict(resolve_model(model), image, device)


#: Seconds between two PredictionProgress events of one prediction (the last always comes).
PREDICTION_PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class PredictionProgress:
    """A prediction has done ``done`` of ``total`` slices (over every plane it predicts along)."""

    done: int
    total: int

    @property
    def percent(self) -> int:
        return int(100 * self.done / max(1, self.total))


@dataclass(frozen=True)
class ScanStarted:
    """Predict-all: scan ``number`` of ``total`` (from 1), named ``name``, is being predicted."""

    number: int
    total: int
    name: str


@dataclass(frozen=True, eq=False)
class ScanSegmented:
    """Predict-all: the prediction of scan ``number`` (``name``)."""

    number: int
    name: str
    result: SegmentationReady


@dataclass(frozen=True)
class ScanFailed:
    """Predict-all: scan ``number`` (``name``) could not be predicted; the others go on.

    ``user_error`` is True for a :class:`~napari_fewlabel.errors.FewLabelError`,
    whose ``message`` says what to do.
    """

    number: int
    name: str
    message: str
    user_error: bool = True


@dataclass(frozen=True)
class ScansPredicted:
    """Predict-all is over: ``predicted`` and ``failed`` of ``total`` scans; ``stopped`` by Stop."""

    predicted: int
    failed: int
    total: int
    stopped: bool = False


def predict_scans(
    model: str | Path,
    scans: Sequence[tuple[str, Volume]],
    device: str = "auto",
    *,
    cancel: CancelFlag | None = None,
) -> Iterator[
    Event | PredictionProgress | ScanStarted | ScanSegmented | ScanFailed | ScansPredicted
]:
    """Predict each ``(name, volume)`` of ``scans`` in turn with one model (loaded once).

    A scan that fails is reported (:class:`ScanFailed`) and the next one goes
    on. ``cancel`` is checked before every batch of slices: once set, the scan
    in progress is abandoned and the job ends with ``ScansPredicted(stopped=True)``;
    the scans finished before it have been sent.
    """
    checkpoint = resolve_model(model)
    loaded = load_checkpoint(checkpoint)
    total, predicted, failed, stopped = len(scans), 0, 0, False
    for number, (name, volume) in enumerate(scans, start=1):
        if cancel is not None and cancel.is_set():
            stopped = True
            break
        yield ScanStarted(number, total, name)
        try:
            for event in _predict(checkpoint, volume, device, model=loaded, cancel=cancel):
                if isinstance(event, SegmentationReady):
                    yield ScanSegmented(number, name, event)
                    predicted += 1
                else:
                    yield event
        except PredictionStopped:
            stopped = True
            break
        except FewLabelError as exc:
            failed += 1
            yield ScanFailed(number, name, str(exc))
        except Exception as exc:  # a scan that breaks the network: report it, go on
            logger.error("Predicting %s failed", name, exc_info=True)
            failed += 1
            yield ScanFailed(number, name, f"{type(exc).__name__}: {exc}", user_error=False)
    yield ScansPredicted(predicted, failed, total, stopped=stopped)


@dataclass(frozen=True, eq=False)
class SlicesSuggested:
    """The unlabelled slices to label next, best first.

    Attributes
    ----------
    slices : tuple of SliceScore
        Ranked by how many voxels the model's two streams label differently.
    checkpoint : Path
        The model that ranked them.
    """

    slices: tuple[SliceScore, ...]
    checkpoint: Path


#: A Refine round (the widget's button) trains this share of the steps of a full run.
REFINE_SHARE = 0.2


def refine_steps(full_steps: int) -> int:
    """Steps of a Refine round after a full run of ``full_steps``: a fifth, at least 10."""
    return max(10, round(REFINE_SHARE * full_steps))


def suggest_next_slices(
    model: str | Path,
    image: Volume,
    exclude: Iterable[int] = (),
    device: str = "auto",
    n: int = 5,
    *,
    cancel: CancelFlag | None = None,
) -> Iterator[Event | SlicesSuggested]:
    """Rank the slices of ``image`` not in ``exclude`` by where ``model``'s streams disagree."""
    checkpoint = resolve_model(model)
    yield Notice("Ranking the unlabelled slices by where the model's two streams disagree...")
    picks = suggest_slices(load_checkpoint(checkpoint), image, n=n, exclude=exclude, device=device)
    yield SlicesSuggested(tuple(picks), Path(checkpoint))


def _relay(events: Iterator[Event]) -> Generator[Event, None, Path | None]:
    """Pass a training job's events on; return the checkpoint its Done names (None if none)."""
    checkpoint: Path | None = None
    for event in events:
        yield event
        if isinstance(event, Done) and event.checkpoint is not None:
            checkpoint = Path(event.checkpoint)
    return checkpoint


def _predict(
    checkpoint: Path,
    image: Volume,
    device: str,
    *,
    model: SegmentationModel | None = None,
    cancel: CancelFlag | None = None,
) -> Iterator[Event | PredictionProgress | SegmentationReady]:
    """Predict ``image`` with ``checkpoint`` (``model``: the same, loaded already).

    ``cancel`` stops the prediction between batches (:class:`PredictionStopped`);
    the jobs that predict after training do not pass it: there Stop means "stop
    training, keep what was learnt and predict with it".
    """
    model = model or load_checkpoint(checkpoint)
    if model.card.modality not in ("unknown", image.modality) and image.modality != "unknown":
        yield Notice(
            f"The model was trained on {model.card.modality} but this scan is "
            f"{image.modality}; expect poor results (adapt it to {image.modality} first).",
            level="warning",
        )
    steps = predict_volume_steps(model, image, device=device, cancel=cancel)
    last = float("-inf")
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            labels: np.ndarray = finished.value
            break
        now = time.monotonic()
        if done == total or now - last >= PREDICTION_PROGRESS_EVERY_S:
            last = now
            yield PredictionProgress(done, total)
    yield SegmentationReady(labels=labels, classes=model.card.classes, checkpoint=Path(checkpoint))
