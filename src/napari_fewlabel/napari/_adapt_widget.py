"""The "Adapt an MRI model to CT" dock widget (Dou et al. 2018, no CT labels).

1. Source model: a segmentation model trained on labelled MRI (named models,
   or a file).
2. Scans: the CT layers to adapt to (ticked), the MRI layers like those the
   model learnt from (ticked; none ticked = the scan named in the model card),
   optionally a Labels layer with one or two painted slices of the first
   ticked CT (their Dice + cross-entropy joins every DAM update), and the CT
   to segment afterwards.
3. Device (the one in use is always shown), budget in joint updates and the
   critic's objective (weight clipping as in the paper, or WGAN-GP).
4. Start / Stop, progress with ETA, a live plot of the critic's Wasserstein
   estimate and the DAM loss.
5. The "<CT> prediction (adapted)" layer and Save model...; the status says
   which checkpoint was kept (the label-free check), or that none beat the
   start and the MRI model applied with the HU window is kept.

The job (``jobs.adapt_and_predict``) runs in a child process like fine-tuning,
so napari stays responsive and Stop keeps the adapted model so far.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.io import METADATA_KEY, Volume
from napari_fewlabel.jobs import PredictionProgress, SegmentationReady, adapt_and_predict
from napari_fewlabel.napari._job_widget import JobWidget
from napari_fewlabel.napari._layers import (
    PREDICTION_KEY,
    layer_meta,
    show_prediction,
    volume_from_layer,
)
from napari_fewlabel.napari._plot import LinePlot
from napari_fewlabel.napari._runner import JobFailed, notify_failure
from napari_fewlabel.train.events import Done, Notice, Progress

if TYPE_CHECKING:
    import napari

FROM_FILE = "From file..."
CHOOSE = "(choose a model trained on MRI)"
NO_CT_LABELS = "(none: no CT label)"


def _items(lst: QListWidget) -> list[QListWidgetItem]:
    return [item for i in range(lst.count()) if (item := lst.item(i)) is not None]


def _layer_modality(layer: Image) -> str:
    return str(layer.metadata.get(METADATA_KEY, {}).get("modality", "unknown"))


def mri_models() -> list[tuple[str, str]]:
    """Named segmentation models not trained on CT: ``(name, path)``.

    Pretrained encoders (no classes to segment) and CT models are left out:
    neither can be adapted to CT.
    """
    from napari_fewlabel.models.checkpoint import is_encoder_only, read_card
    from napari_fewlabel.models.registry import list_models

    out = []
    for entry in list_models():
        try:
            card = read_card(entry.path)
        except FewLabelError:
            continue
        if card.modality != "CT" and not is_encoder_only(card):
            out.append((entry.name, str(entry.path)))
    return out


class AdaptWidget(JobWidget):
    """Make an MRI segmentation model work on CT without CT labels."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, scratch_prefix="fewlabel-adapt-")
        self._checkpoint: Path | None = None
        self._predict_layer: Image | None = None
        self._verdict = ""

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_model_box())
        layout.addWidget(self._build_scans_box())
        layout.addWidget(self._build_device_box())
        layout.addWidget(self._build_run_box())
        layout.addWidget(self._build_results_box())
        layout.addStretch(1)

        self._follow_layers()

    # ------------------------------------------------------------ layout
    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("1. Source model (trained on MRI)")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.addItem(CHOOSE, None)
        for name, path in mri_models():
            self.model_combo.addItem(name, path)
        self.model_combo.addItem(FROM_FILE, FROM_FILE)
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setStyleSheet("color: gray")
        self.model_combo.currentIndexChanged.connect(self._describe_model)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.model_info)
        return box

    def _build_scans_box(self) -> QGroupBox:
        box = QGroupBox("2. Scans")
        form = QFormLayout(box)
        self.target_list = QListWidget()
        self.target_list.setToolTip("Unlabelled CT scans to adapt to (tick one or more).")
        self.source_list = QListWidget()
        self.source_list.setToolTip(
            "MRI scans like those the model learnt from; labels are not needed. None ticked: "
            "the scan named in the model card."
        )
        for lst in (self.target_list, self.source_list):
            lst.setMaximumHeight(90)
        self.predict_combo = QComboBox()
        self.ct_labels_combo = QComboBox()
        self.ct_labels_combo.setToolTip(
            "Optional: a Labels layer on the first ticked CT with one or two painted slices "
            "(the model's classes; unpainted slices stay 0). They are learnt with Dice + "
            "cross-entropy in every DAM update, besides the critic. With painted CT slices, "
            "fine-tuning the MRI model on them (the 'Fine-tune and segment' widget, Start from "
            "the model) did better than adaptation on both test pairs: docs/adaptation.md."
        )
        form.addRow("Target CT", self.target_list)
        form.addRow("Source MRI", self.source_list)
        form.addRow("CT labels", self.ct_labels_combo)
        form.addRow("Then segment", self.predict_combo)
        return box

    def _build_device_box(self) -> QGroupBox:
        box = QGroupBox("3. Device and budget")
        form = QFormLayout(box)
        self.device_combo = self._device_combo()
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(2, 100_000)
        from napari_fewlabel.train.adapt import DEFAULT_STEPS

        self.steps_spin.setValue(DEFAULT_STEPS)
        self.steps_spin.setSuffix(" joint updates")
        self.critic_combo = QComboBox()
        self.critic_combo.addItem("weight clipping (Dou et al.)", "clip")
        self.critic_combo.addItem("gradient penalty (WGAN-GP)", "gp")
        self.critic_combo.setToolTip(
            "Weight clipping is the paper's critic (20 critic updates per DAM update). The "
            "gradient penalty (5 per DAM update) did better on the cardiac phantom and worse on "
            "the real head pair: see docs/adaptation.md."
        )
        form.addRow("Device", self.device_combo)
        form.addRow("In use", self.device_label)
        form.addRow("Budget", self.steps_spin)
        form.addRow("Critic", self.critic_combo)
        return box

    def _build_run_box(self) -> QGroupBox:
        return self._run_box(
            "4. Adapt", "Choose an MRI model and tick the CT scans, then press Start.", LinePlot()
        )

    def _build_results_box(self) -> QGroupBox:
        box = QGroupBox("5. Results")
        layout = QHBoxLayout(box)
        self.save_model_button = QPushButton("Save model...")
        self.save_model_button.setEnabled(False)
        self.save_model_button.clicked.connect(self._ask_save_model)
        layout.addWidget(self.save_model_button)
        return box

    # ------------------------------------------------------------ layers
    def _image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_layers(self, event: Any = None) -> None:
        for lst, modality in ((self.target_list, "CT"), (self.source_list, "MR")):
            ticked = {id(layer) for layer in self._ticked(lst)}
            known = {id(item.data(Qt.ItemDataRole.UserRole)) for item in _items(lst)}
            lst.clear()
            for layer in self._image_layers():
                item = QListWidgetItem(layer.name)
                item.setData(Qt.ItemDataRole.UserRole, layer)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                # A new layer of the right modality comes ticked; the user's choices stay.
                on = id(layer) in ticked or (
                    id(layer) not in known and _layer_modality(layer) == modality
                )
                item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
                lst.addItem(item)
        current = self.predict_combo.currentData()
        self.predict_combo.clear()
        for layer in self._image_layers():
            if _layer_modality(layer) != "MR":
                self.predict_combo.addItem(layer.name, layer)
        index = self.predict_combo.findData(current) if current is not None else -1
        if index >= 0:
            self.predict_combo.setCurrentIndex(index)
        chosen = self.ct_labels_combo.currentData()
        self.ct_labels_combo.clear()
        self.ct_labels_combo.addItem(NO_CT_LABELS, None)
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and not layer.metadata.get(PREDICTION_KEY):
                self.ct_labels_combo.addItem(layer.name, layer)
        index = self.ct_labels_combo.findData(chosen) if chosen is not None else -1
        self.ct_labels_combo.setCurrentIndex(max(index, 0))

    @staticmethod
    def _ticked(lst: QListWidget) -> list[Image]:
        return [
            item.data(Qt.ItemDataRole.UserRole)
            for item in _items(lst)
            if item.checkState() == Qt.CheckState.Checked
        ]

    def set_ticked(self, which: str, layers: list[Image]) -> None:
        """Tick exactly ``layers`` in the "target" or "source" list."""
        lst = self.target_list if which == "target" else self.source_list
        for item in _items(lst):
            on = item.data(Qt.ItemDataRole.UserRole) in layers
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    # ------------------------------------------------------------ model & device
    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != FROM_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose an MRI model", "", "Models (*.safetensors)"
        )
        if path:
            self.add_model_file(Path(path))
        else:
            self.model_combo.setCurrentIndex(0)

    def add_model_file(self, path: Path) -> None:
        """Put a checkpoint file in the model list and select it."""
        self.model_combo.insertItem(1, path.name, str(path))
        self.model_combo.setCurrentIndex(1)

    def _selected_model(self) -> str | None:
        data = self.model_combo.currentData()
        return None if data in (None, FROM_FILE) else str(data)

    def _describe_model(self, *_: Any) -> None:
        from napari_fewlabel.models.checkpoint import read_card

        path = self._selected_model()
        if path is None:
            self.model_info.setText("")
            return
        try:
            card = read_card(path)
        except FewLabelError as exc:
            self.model_info.setText(str(exc))
            return
        names = ", ".join(c.name for c in card.classes[1:])
        self.model_info.setText(f"{card.modality} model: {names}")

    # ------------------------------------------------------------ run
    def _on_start_stop(self) -> None:
        if self.runner.is_running:
            self.stop()
        else:
            self.start()

    def _volume(self, layer: Image, modality: str) -> Volume:
        volume = volume_from_layer(np.asarray(layer.data), layer_meta(layer), what="image layer")
        return volume.with_array(volume.array, modality=modality)  # type: ignore[arg-type]

    def start(self) -> bool:
        """Validate the inputs and start adapting; False (with a notification) if refused."""
        if self.runner.is_running:
            show_warning("A job is already running: press Stop first.")
            return False
        try:
            job, predict_on = self._build_job()
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        self.plot.clear()
        self.runner.start(adapt_and_predict, job, predict_on)
        self.start_button.setText("Stop")
        self.status.setText("Starting (reading the scans and the model)...")
        self.progress.setRange(0, job.steps)
        self.progress.setValue(0)
        return True

    def _build_job(self) -> tuple[Any, Volume]:
        from napari_fewlabel.train.adapt import AdaptJob, AdaptSettings

        model = self._selected_model()
        if model is None:
            raise FewLabelError(
                "Choose the source model in '1. Source model': a segmentation model trained on "
                "labelled MRI (fine-tune one with the 'Fine-tune and segment' widget, then Save "
                "model...), or 'From file...'."
            )
        targets = self._ticked(self.target_list)
        if not targets:
            raise FewLabelError(
                "Tick at least one CT scan under 'Target CT' (open one with File > Open)."
            )
        mr_targets = [t.name for t in targets if _layer_modality(t) == "MR"]
        if mr_targets:
            raise FewLabelError(
                f"{', '.join(mr_targets)} is MR, not CT: untick it under 'Target CT' (MRI scans "
                "go under 'Source MRI')."
            )
        predict_layer = self.predict_combo.currentData()
        if predict_layer is None or predict_layer not in self.viewer.layers:
            predict_layer = targets[0]
        self._predict_layer = predict_layer
        target = tuple(self._volume(t, "CT") for t in targets)
        job = AdaptJob(
            source_model=model,
            target=target,
            target_labels=self._ct_labels(targets[0], target[0]),
            source=tuple(self._volume(s, "MR") for s in self._ticked(self.source_list)),
            out=self._workdir / f"adapted-{time.strftime('%Y%m%d-%H%M%S')}.safetensors",
            steps=self.steps_spin.value(),
            device=self.device_combo.currentText(),
            settings=AdaptSettings.for_objective(self.critic_combo.currentData()),
        )
        return job, self._volume(predict_layer, "CT")

    def _ct_labels(self, first: Image, ct: Volume) -> Volume | None:
        """The chosen Labels layer as a label map on the first ticked CT's grid, or None."""
        layer = self.ct_labels_combo.currentData()
        if layer is None or layer not in self.viewer.layers:
            return None
        data = np.asarray(layer.data)
        if data.shape != ct.shape:
            raise FewLabelError(
                f"The labels layer {layer.name} is {data.shape} voxels but the first ticked CT, "
                f"{first.name}, is {ct.shape}: paint the CT slices on a Labels layer of that CT "
                "(Layers > New Labels layer with it selected)."
            )
        if not data.any():
            raise FewLabelError(
                f"Nothing is painted in {layer.name}: paint one or two CT slices with the "
                f"model's classes, or choose '{NO_CT_LABELS}' under 'CT labels'."
            )
        return ct.with_array(data.astype(np.int64))

    def stop(self) -> None:
        """Stop adapting (kept: the adapted model so far, then a prediction with it)."""
        self._stop_then_cancel(self.start_button, self.status, "prediction", "update")

    # ------------------------------------------------------------ events
    def _on_event(self, event: Any) -> None:
        if isinstance(event, Progress):
            self._show_progress(event, self.progress, self.status, self.plot, losses_in_status=True)
        elif isinstance(event, Notice):
            (show_warning if event.level == "warning" else show_info)(event.message)
            self.status.setText(event.message)
        elif isinstance(event, Done):
            self._checkpoint = event.checkpoint
            self.save_model_button.setEnabled(event.checkpoint is not None)
            self.start_button.setText("Cancel prediction")
            what = "Stopped" if event.cancelled else "Adaptation done"
            verdict = event.summary.get("verdict")
            self._verdict = f" ({verdict})" if verdict else ""
            self.status.setText(
                f"{what}{self._verdict}; segmenting the CT with the adapted model..."
            )
            self.progress.setRange(0, 0)
        elif isinstance(event, PredictionProgress):
            self._show_prediction_progress(event, self.progress)
        elif isinstance(event, SegmentationReady):
            self._show_prediction(event)

    def _show_prediction(self, event: SegmentationReady) -> None:
        layer = self._predict_layer
        if layer is None or layer not in self.viewer.layers:
            show_warning("The CT was closed before its prediction arrived; nothing to show.")
            return
        volume = self._volume(layer, "CT")
        show_prediction(self.viewer, f"{layer.name} prediction (adapted)", volume, event)
        self._checkpoint = event.checkpoint
        self.save_model_button.setEnabled(True)
        self.status.setText(
            f"Done{self._verdict}: the adapted prediction is shown. Save model... keeps the CT "
            "model."
        )

    def _on_failed(self, failure: JobFailed) -> None:
        self.status.setText(notify_failure(failure, "The adaptation"))

    def _on_finished(self) -> None:
        self.start_button.setText("Start")
        self.progress.setFormat("%v / %m steps")
        self.progress.setRange(0, max(self.progress.maximum(), 1))

    # ------------------------------------------------------------ results
    def _ask_save_model(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the adapted model", "adapted-ct.safetensors", "Models (*.safetensors)"
        )
        if path:
            self.save_model(Path(path))

    def save_model(self, path: Path) -> Path | None:
        """Write the adapted model (weights and card; the critic's state stays behind)."""
        from napari_fewlabel.models.checkpoint import save_model_copy

        if self._checkpoint is None or not self._checkpoint.exists():
            show_error("No adapted model yet: press Start first.")
            return None
        try:
            path = save_model_copy(self._checkpoint, path)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        show_info(f"Adapted model saved to {path}")
        return path
