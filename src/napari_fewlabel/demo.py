"""The demo case: the synthetic cardiac MRI with two labelled slices, end to end.

``fewlabel demo --headless`` runs :func:`run_headless`: the same loop the
widget runs (fine-tune on two labelled slices, predict the whole volume,
export NIfTI) and writes everything a user would want to look at into one
folder, with a JSON report scored against the phantom's truth. The phantom
is synthetic (``data/phantoms.py``), not a patient.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_fewlabel import __version__
from napari_fewlabel.data.phantoms import CardiacPhantom, cardiac_phantom
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.metrics import class_metrics
from napari_fewlabel.io import MaskInfo, save_image, save_labels
from napari_fewlabel.io.atomic import atomic_path
from napari_fewlabel.jobs import PredictionProgress, SegmentationReady, finetune_and_predict
from napari_fewlabel.train.events import Done, Event, Notice, Progress
from napari_fewlabel.train.finetune import FinetuneJob

#: The sample's size (also what napari's "Open Sample" gives).
DEMO_SHAPE = (64, 160, 160)
DEMO_SPACING_MM = (2.0, 1.5, 1.5)


@dataclass(frozen=True)
class DemoCase:
    """The phantom and the two slices a radiologist would have labelled."""

    phantom: CardiacPhantom
    labelled_slices: tuple[int, ...]

    @property
    def annotation(self) -> np.ndarray:
        painted = np.zeros_like(self.phantom.labels.array)
        index = list(self.labelled_slices)
        painted[index] = self.phantom.labels.array[index]
        return painted


def demo_case(modality: str = "MR") -> DemoCase:
    phantom = cardiac_phantom(modality, shape=DEMO_SHAPE, spacing_mm=DEMO_SPACING_MM)  # type: ignore[arg-type]
    # Two axial slices at a third and two thirds of the heart's extent.
    present = np.flatnonzero(phantom.labels.array.any(axis=(1, 2)))
    lo, hi = int(present.min()), int(present.max())
    slices = (lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3)
    return DemoCase(phantom=phantom, labelled_slices=slices)


def run_headless(
    out_dir: Path,
    *,
    steps: int | None = None,
    device: str = "auto",
    on_event: Callable[[Event | PredictionProgress | SegmentationReady], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune on the demo case, predict, export, score; returns the report."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FewLabelError(
            f"Cannot create {out_dir} ({exc.strerror}): choose another --out."
        ) from exc
    case = demo_case()
    image = case.phantom.image
    save_image(image, out_dir / "cardiac_mri_phantom.nii.gz")
    named = MaskInfo.of_classes(case.phantom.classes)
    save_labels(
        case.annotation, like=image, path=out_dir / "annotation_2_slices.nii.gz", info=named
    )
    job_kwargs: dict[str, Any] = {"steps": steps} if steps else {}
    job = FinetuneJob(
        image=image,
        labels=case.annotation,
        out=out_dir / "model.safetensors",
        classes=case.phantom.classes,
        device=device,
        **job_kwargs,
    )
    started = time.perf_counter()
    done: Done | None = None
    ready: SegmentationReady | None = None
    device_used = ""
    for event in finetune_and_predict(job):
        if on_event is not None:
            on_event(event)
        if isinstance(event, Progress):
            device_used = event.device
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, SegmentationReady):
            ready = event
    if done is None or ready is None:
        raise FewLabelError("The demo produced no prediction: see the messages above.")
    mask_path = save_labels(
        ready.labels, like=image, path=out_dir / "prediction.nii.gz", info=named
    )
    truth = case.phantom.labels.array
    unlabelled = [z for z in range(truth.shape[0]) if z not in case.labelled_slices]
    metrics = class_metrics(
        ready.labels[unlabelled],
        truth[unlabelled],
        image.spacing_mm,
        class_names=[c.name for c in case.phantom.classes],
    )
    report = {
        "what": "synthetic cardiac MRI phantom, 2 labelled axial slices, fine-tuned and predicted",
        "labelled_slices": list(case.labelled_slices),
        "steps": done.summary.get("steps_done"),
        "device": device_used,
        "seconds": round(time.perf_counter() - started, 1),
        "mean_dice_unlabelled_slices": round(float(np.mean([m.dice for m in metrics])), 4),
        "classes": [
            {"name": m.name, "dice": round(m.dice, 4), "hd95_mm": _number(m.hd95_mm)}
            for m in metrics
        ],
        "outputs": {
            "scan": "cardiac_mri_phantom.nii.gz",
            "annotation": "annotation_2_slices.nii.gz",
            "prediction": mask_path.name,
            "model": Path(ready.checkpoint).name,
        },
        "package_version": __version__,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _number(value: float) -> float | None:
    return None if value != value else round(float(value), 2)  # NaN -> null


def describe(event: Event | PredictionProgress | SegmentationReady) -> str | None:
    """One line for a terminal, or None for events not worth a line."""
    if isinstance(event, Notice):
        return event.message
    if isinstance(event, Progress) and (event.step % 25 == 0 or event.step == event.total):
        dice = f", validation Dice {event.val_dice:.3f}" if event.val_dice is not None else ""
        eta = f", {event.eta_s:.0f} s left" if event.eta_s is not None else ""
        return f"step {event.step}/{event.total}{dice}{eta} ({event.device})"
    if isinstance(event, PredictionProgress) and event.done == event.total:
        return f"predicted {event.total} slices"
    return None
