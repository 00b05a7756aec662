"""The "Fine-tune and segment" dock widget, laid out in the order of work.

1. Scan: which image layer, CT or MR (detected by the reader, overridable).
2. Annotation: which labels layer (or a new one with the scan's geometry and
   the chosen classes), the class preset, a live count of labelled slices,
   and "Mark slice empty" for a slice checked and found without any structure.
3. Model, device (the one in use is always shown) and training budget.
4. Start / Stop, progress with ETA, a live plot of the losses and validation Dice.
5. Results: the "<image> prediction" layer, Save model..., Export mask...
   (NIfTI, or DICOM SEG for a scan read from DICOM), Predict with model for an
   existing checkpoint, Predict all open scans with it, Label next (the
   unlabelled slice where the model is least sure, shown in the viewer) and
   Refine (continue from the last model with the slices corrected since).

The work runs in a child process (``_runner.ProcessRunner``) so napari stays
responsive; everything it reports arrives as events from the engine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_fewlabel.data.classes import SegmentationClass, default_classes
from napari_fewlabel.data.presets import CLASS_PRESETS, CUSTOM
from napari_fewlabel.data.slices import (
    AXIS_NAMES,
    check_empty_slices,
    corrected_slices,
    infer_slice_axis,
    labelled_slices,
)
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.suggest import SliceScore
from napari_fewlabel.io import METADATA_KEY, Volume, save_labels
from napari_fewlabel.jobs import (
    PredictionProgress,
    ScanFailed,
    ScanSegmented,
    ScansPredicted,
    ScanStarted,
    SegmentationReady,
    SlicesSuggested,
    finetune_and_predict,
    predict_scans,
    predict_with_model,
    refine_steps,
    suggest_next_slices,
)
from napari_fewlabel.napari._job_widget import JobWidget
from napari_fewlabel.napari._layers import (
    CLASSES_KEY,
    EMPTY_SLICES_KEY,
    PREDICTION_KEY,
    PREVIEW_KEY,
    labels_layer_data,
    layer_meta,
    mask_info_of,
    show_prediction,
    slice_on_screen,
    volume_from_layer,
)
from napari_fewlabel.napari._plot import LinePlot
from napari_fewlabel.napari._runner import JobFailed, notify_failure
from napari_fewlabel.train.events import Done, Notice, Preview, Progress
from napari_fewlabel.train.finetune import RANDOM_INIT
from napari_fewlabel.train.preview import PREVIEW_EVERY_S

if TYPE_CHECKING:
    import napari

FROM_FILE = "From file..."
DEFAULT_START = "default (pretrained encoder)"
RANDOM_START = "none (random initialisation)"
DEFAULT_STEPS = 300
PREDICT_ALL = "Predict all open scans"
NIFTI_FILTER = "NIfTI (*.nii.gz *.nii)"
SEG_FILTER = "DICOM SEG (*.dcm)"


class FinetuneWidget(JobWidget):
    """Label a few slices, press Start, get the whole volume segmented."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, scratch_prefix="fewlabel-")
        self._checkpoint: Path | None = None
        self._prediction_layer: Labels | None = None
        self._job_image: Image | None = None
        self._job_kind = ""
        self._suggestions: SlicesSuggested | None = None
        # The prediction as last shown, to find the slices corrected since.
        self._shown_prediction: np.ndarray | None = None
        self._refine_axis = 0
        # Live preview: its layer, the classes of the run, the slices it shows now.
        self._preview_layer: Labels | None = None
        self._preview_classes: tuple[SegmentationClass, ...] = ()
        self._preview_shown: tuple[int, int, int] | None = None
        self._following_view = False
        #: Seconds between live previews (``FinetuneJob.preview_every_s``).
        self.preview_every_s = PREVIEW_EVERY_S
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(250)
        self._count_timer.timeout.connect(self._update_slice_count)
        self._watched_labels: Labels | None = None
        # Predict all open scans: the scan layers sent (in order), what came back.
        self._batch_layers: list[Image] = []
        self._batch_volumes: list[str] = []
        self._batch_failed = 0
        self._batch_scan: tuple[int, int, str] | None = None
        self._batch_left_out = 0
        self._batch_end: ScansPredicted | None = None
        self._job_failed = False

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_scan_box())
        layout.addWidget(self._build_annotation_box())
        layout.addWidget(self._build_model_box())
        layout.addWidget(self._build_run_box())
        layout.addWidget(self._build_results_box())
        layout.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.viewer.layers.events.reordered.connect(self._refresh_layers)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------ layout
    def _build_scan_box(self) -> QGroupBox:
        box = QGroupBox("1. Scan")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(["CT", "MR"])
        self.modality_hint = QLabel("")
        self.modality_hint.setStyleSheet("color: gray")
        form.addRow("Image", self.image_combo)
        row = QHBoxLayout()
        row.addWidget(self.modality_combo)
        row.addWidget(self.modality_hint, 1)
        form.addRow("Modality", row)
        return box

    def _build_annotation_box(self) -> QGroupBox:
        box = QGroupBox("2. Annotation")
        form = QFormLayout(box)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([*CLASS_PRESETS, CUSTOM])
        self.preset_combo.currentTextChanged.connect(self._on_preset_changed)
        self.custom_names = QLineEdit()
        self.custom_names.setPlaceholderText("class names, comma-separated (e.g. liver, tumour)")
        self.custom_names.setVisible(False)
        self.labels_combo = QComboBox()
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.new_labels_button = QPushButton("New annotation layer")
        self.new_labels_button.clicked.connect(self.new_annotation_layer)
        self.slice_count = QLabel("no labelled slice yet")
        self.slice_count.setWordWrap(True)
        self.empty_button = QPushButton("Mark slice empty")
        self.empty_button.setToolTip(
            "The slice on screen holds none of the structures: train on it as background. "
            "Mark a few such slices where the prediction shows false positives. "
            "Press again on a marked slice to unmark it."
        )
        self.empty_button.clicked.connect(self.toggle_empty_slice)
        self.save_annotation_button = QPushButton("Save annotation...")
        self.save_annotation_button.setToolTip(
            "Save the annotation layer as NIfTI on the scan's grid, with its class names and "
            "the slices marked empty; File > Open brings it back as it was."
        )
        self.save_annotation_button.clicked.connect(self._ask_save_annotation)
        form.addRow("Classes", self.preset_combo)
        form.addRow("", self.custom_names)
        form.addRow("Labels", self.labels_combo)
        form.addRow("", self.new_labels_button)
        form.addRow("Labelled", self.slice_count)
        form.addRow("", self.empty_button)
        form.addRow("", self.save_annotation_button)
        return box

    def _build_model_box(self) -> QGroupBox:
        from napari_fewlabel.models.registry import list_models

        box = QGroupBox("3. Model and device")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        # None: the job picks the shipped pretrained encoder when it suits the scan.
        self.model_combo.addItem(DEFAULT_START, None)
        self.model_combo.setItemData(
            0,
            "The shipped pretrained encoder for the scan's modality, or a random start "
            "when there is none.",
            Qt.ItemDataRole.ToolTipRole,
        )
        for entry in list_models():
            self.model_combo.addItem(entry.name, str(entry.path))
        self.model_combo.addItem(RANDOM_START, RANDOM_INIT)
        self.model_combo.addItem(FROM_FILE, FROM_FILE)
        self.model_combo.activated.connect(self._on_model_activated)
        self.device_combo = self._device_combo()
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(10, 100_000)
        self.steps_spin.setValue(DEFAULT_STEPS)
        self.minutes_spin = QSpinBox()
        self.minutes_spin.setRange(0, 24 * 60)
        self.minutes_spin.setSpecialValueText("no limit")
        self.minutes_spin.setSuffix(" min")
        form.addRow("Start from", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("In use", self.device_label)
        budget = QHBoxLayout()
        budget.addWidget(QLabel("steps"))
        budget.addWidget(self.steps_spin)
        budget.addWidget(QLabel("or at most"))
        budget.addWidget(self.minutes_spin)
        form.addRow("Budget", budget)
        return box

    def _build_run_box(self) -> QGroupBox:
        return self._run_box(
            "4. Fine-tune",
            "Paint a few slices, then press Start.",
            LinePlot(unit_range=("val Dice",)),
        )

    def _build_results_box(self) -> QGroupBox:
        box = QGroupBox("5. Results")
        layout = QVBoxLayout(box)
        self.save_model_button = QPushButton("Save model...")
        self.save_model_button.clicked.connect(self._ask_save_model)
        self.export_button = QPushButton("Export mask...")
        self.export_button.setToolTip(
            "Write the prediction selected in the layer list (else the last one) on the scan's "
            "own voxel grid: NIfTI, or DICOM SEG (.dcm) for a scan opened from a DICOM series."
        )
        self.export_button.clicked.connect(self._ask_export_mask)
        self.predict_button = QPushButton("Predict with model")
        self.predict_button.clicked.connect(self.predict_with_selected_model)
        self.predict_all_button = QPushButton(PREDICT_ALL)
        self.predict_all_button.setToolTip(
            "Segment every open scan with the model chosen in 'Start from' (or the one just "
            "fine-tuned), one after another in the background; each gets its '<scan> "
            "prediction' layer. Press again (or Stop) to stop after the current batch of slices."
        )
        self.predict_all_button.clicked.connect(self._on_predict_all_clicked)
        self.next_button = QPushButton("Label next")
        self.next_button.setToolTip(
            "Show the unlabelled slice where the model's two streams disagree most: a label "
            "there teaches it the most. Press again for the next one on the list."
        )
        self.next_button.clicked.connect(self.label_next)
        self.refine_button = QPushButton("Refine")
        self.refine_button.setToolTip(
            "Correct the prediction on a few slices (or paint more slices of the annotation), "
            "then Refine: training goes on from the last model with those slices, for a fifth "
            "of the steps, and the prediction is replaced (Ctrl+Z brings it back)."
        )
        self.refine_button.clicked.connect(self.refine)
        for button in (self.save_model_button, self.export_button, self.refine_button):
            button.setEnabled(False)
        rows = (
            (self.predict_button, self.predict_all_button, self.next_button),
            (self.refine_button, self.save_model_button, self.export_button),
        )
        for buttons in rows:
            row = QHBoxLayout()
            for button in buttons:
                row.addWidget(button)
            layout.addLayout(row)
        return box

    # ------------------------------------------------------------ layers
    def _refresh_layers(self, event: Any = None) -> None:
        # The pickers keep the layers themselves (item data), so a renamed layer stays
        # selected; the text shown is the layer's current name.
        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for layer in self.viewer.layers:
                if isinstance(layer, kind) and not layer.metadata.get(PREVIEW_KEY):
                    combo.addItem(layer.name, layer)
            index = combo.findData(current) if current is not None else -1
            if index >= 0:
                combo.setCurrentIndex(index)
            combo.blockSignals(False)
        if event is not None and getattr(event, "type", "") == "inserted":
            layer = event.value
            layer.events.name.connect(self._refresh_layers)
            # A new Labels layer becomes the annotation, unless it is a prediction.
            if isinstance(layer, Labels) and not layer.metadata.get(PREDICTION_KEY):
                self.labels_combo.setCurrentIndex(self.labels_combo.findData(layer))
        self._on_image_changed()
        self._on_labels_changed()

    def selected_image(self) -> Image | None:
        layer = self.image_combo.currentData()
        return layer if layer in self.viewer.layers else None

    def selected_labels(self) -> Labels | None:
        layer = self.labels_combo.currentData()
        return layer if layer in self.viewer.layers else None

    def _on_image_changed(self, *_: Any) -> None:
        image = self.selected_image()
        if image is None:
            self.modality_hint.setText("open a scan (File > Open, or File > Open Sample)")
            return
        meta = image.metadata.get(METADATA_KEY, {})
        detected = meta.get("modality", "unknown")
        if detected in ("CT", "MR"):
            self.modality_combo.setCurrentText(detected)
            self.modality_hint.setText(f"detected {detected}")
        else:
            self.modality_hint.setText("not detected: choose")

    def _on_labels_changed(self, *_: Any) -> None:
        labels = self.selected_labels()
        if self._watched_labels is not None and self._watched_labels is not labels:
            for signal in (self._watched_labels.events.paint, self._watched_labels.events.data):
                signal.disconnect(self._schedule_count)
        if labels is not None and labels is not self._watched_labels:
            labels.events.paint.connect(self._schedule_count)
            labels.events.data.connect(self._schedule_count)
            classes = labels.metadata.get(CLASSES_KEY)
            if classes:
                self._show_classes_of_layer(classes)
        self._watched_labels = labels
        self._update_slice_count()

    def _show_classes_of_layer(self, classes: list[dict[str, Any]]) -> None:
        names = [c["name"] for c in classes]
        for preset, preset_classes in CLASS_PRESETS.items():
            if [c.name for c in preset_classes] == names:
                self.preset_combo.setCurrentText(preset)
                return
        self.preset_combo.setCurrentText(CUSTOM)
        self.custom_names.setText(", ".join(names[1:]))

    def _schedule_count(self, *_: Any) -> None:
        self._count_timer.start()  # debounced: painting emits many events

    def _update_slice_count(self) -> None:
        labels = self.selected_labels()
        if labels is None:
            self.slice_count.setText("no annotation layer: press 'New annotation layer'")
            return
        data = np.asarray(labels.data)
        _, empty = marked_empty(labels)
        marked = f"; marked empty: {_listed(empty)}" if empty else ""
        if data.ndim != 3 or not data.any():
            self.slice_count.setText(
                "no labelled slice yet: paint any structure on a slice" + marked
            )
            return
        axis = infer_slice_axis(data).axis
        slices = labelled_slices(data, axis)
        classes = self.current_classes(max_label=int(data.max()))
        per_class = []
        for cls in classes[1:]:
            n = labelled_slices(data == cls.index, axis).size
            per_class.append(f"{cls.name}: {n}")
        self.slice_count.setText(
            f"{slices.size} {AXIS_NAMES[axis]} slice(s) ({_listed(slices.tolist())}); "
            + "; ".join(per_class)
            + marked
        )

    def toggle_empty_slice(self) -> bool:
        """Mark the slice on screen empty (trained as background), or unmark it; False if refused."""
        try:
            axis, index = self._slice_on_screen()
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        labels = self.selected_labels()
        assert labels is not None  # _slice_on_screen checked it
        marked_axis, empty = marked_empty(labels)
        data = np.asarray(labels.data)
        if index in empty and marked_axis == axis:
            empty.remove(index)
            message = f"Slice {index} ({AXIS_NAMES[axis]}) is no longer marked empty."
        else:
            # Marks and paint share one slice axis, the one training will use.
            painted_axis = infer_slice_axis(data).axis if data.any() else axis
            expected = marked_axis if empty else painted_axis
            if expected != axis:
                show_error(
                    f"The slices so far are {AXIS_NAMES[expected]} but the view shows "
                    f"{AXIS_NAMES[axis]} slices: switch the view to that orientation, then mark."
                )
                return False
            if np.take(data, index, axis=axis).any():
                show_error(
                    f"Slice {index} has painted voxels, so it is labelled already: erase the "
                    "paint first if the slice holds none of the structures."
                )
                return False
            empty = sorted({*empty, index})
            message = f"Slice {index} ({AXIS_NAMES[axis]}) marked empty: it trains as background."
        labels.metadata[EMPTY_SLICES_KEY] = {"axis": axis, "slices": empty}
        self._update_slice_count()
        show_info(message)
        return True

    def _slice_on_screen(self) -> tuple[int, int]:
        """(data axis, index) of the annotation layer's slice shown in the 2D view."""
        labels = self.selected_labels()
        if labels is None or labels.ndim != 3:
            raise FewLabelError(
                "Choose a 3D annotation layer in '2. Annotation' (or press 'New annotation "
                "layer'), then show the slice to mark."
            )
        dims = self.viewer.dims
        if dims.ndisplay != 2 or len(dims.not_displayed) != dims.ndim - 2:
            raise FewLabelError("Switch to the 2D view and show the slice to mark as empty.")
        where = slice_on_screen(self.viewer, labels)
        if where is None:
            raise FewLabelError(
                "The view is outside the annotation layer: scroll to a slice of the scan."
            )
        return where

    def _on_preset_changed(self, name: str) -> None:
        self.custom_names.setVisible(name == CUSTOM)

    def current_classes(self, max_label: int = 0) -> tuple[SegmentationClass, ...]:
        """The classes chosen in the widget (grown to ``max_label`` if the user painted more)."""
        preset = self.preset_combo.currentText()
        if preset == CUSTOM:
            names = [n.strip() for n in self.custom_names.text().split(",") if n.strip()]
            base = default_classes(max(len(names) + 1, max_label + 1, 2))
            return tuple(
                SegmentationClass(c.index, names[c.index - 1], c.color)
                if 0 < c.index <= len(names)
                else c
                for c in base
            )
        classes = CLASS_PRESETS[preset]
        if max_label >= len(classes):
            extra = default_classes(max_label + 1)[len(classes) :]
            classes = classes + extra
        return classes

    def new_annotation_layer(self) -> Labels | None:
        """A Labels layer with the scan's geometry and the chosen classes' colours."""
        image = self.selected_image()
        if image is None:
            show_error("Open a scan first (File > Open, or File > Open Sample), then add labels.")
            return None
        try:
            volume = self._image_volume(image)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        classes = self.current_classes()
        data, kwargs, _ = labels_layer_data(
            np.zeros(volume.shape, np.uint8), volume, f"{image.name} annotation", classes
        )
        layer = self.viewer.add_labels(data, **kwargs)
        layer.selected_label = 1
        layer.mode = "paint"
        layer.brush_size = 10
        self.labels_combo.setCurrentIndex(self.labels_combo.findData(layer))
        self.viewer.layers.selection.active = layer
        show_info(
            "Paint a few slices (any nonzero value marks the whole slice as labelled; "
            "unpainted voxels there are background), then press Start. A slice with none "
            "of the structures: show it and press 'Mark slice empty'."
        )
        return layer

    # ------------------------------------------------------------ model & device
    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != FROM_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model", "", "Models (*.safetensors)")
        if path:
            self.add_model_file(Path(path))

    def add_model_file(self, path: Path) -> None:
        """Put a checkpoint file in the model list and select it."""
        self.model_combo.insertItem(0, path.name, str(path))
        self.model_combo.setCurrentIndex(0)

    def _selected_model(self) -> str | None:
        """What 'Start from' says: a model path, RANDOM_INIT, or None for the default."""
        data = self.model_combo.currentData()
        return None if data in (None, FROM_FILE) else str(data)

    # ------------------------------------------------------------ run
    def _on_start_stop(self) -> None:
        if self.runner.is_running:
            self.stop()
        else:
            self.start()

    def _image_volume(self, image: Image) -> Volume:
        volume = volume_from_layer(np.asarray(image.data), layer_meta(image), what="image layer")
        modality = self.modality_combo.currentText()
        return volume.with_array(volume.array, modality=modality)  # type: ignore[arg-type]

    def start(self) -> bool:
        """Validate the inputs and start fine-tuning; False (with a notification) if refused."""
        if self.runner.is_running:
            show_warning("A job is already running: press Stop first.")
            return False
        try:
            job = self._build_job()
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        self._preview_classes = job.classes or ()
        self._start_job("finetune", finetune_and_predict, job)
        self.status.setText("Starting (the first step takes a few seconds)...")
        self.progress.setRange(0, job.steps)
        self.progress.setValue(0)
        return True

    def refine(self) -> bool:
        """Train on from the last model with the slices corrected since; False if refused.

        Slices of the prediction layer changed since it was shown become labelled
        slices of the annotation (the whole slice: what was not corrected is
        accepted); slices painted on the annotation layer count too. The run
        starts from all weights of the last model, for a fifth of the steps
        (:func:`~napari_fewlabel.jobs.refine_steps`), and writes a new model file:
        the earlier one is kept.
        """
        if self.runner.is_running:
            show_warning("A job is already running: wait for it or press Stop.")
            return False
        try:
            job = self._build_refine_job()
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        self._preview_classes = job.classes or ()
        self._start_job("refine", finetune_and_predict, job)
        self.status.setText(
            f"Refining {Path(str(job.model)).name} for {job.steps} steps with "
            f"{len(labelled_slices(np.asarray(job.labels), self._refine_axis))} labelled slices..."
        )
        self.progress.setRange(0, job.steps)
        self.progress.setValue(0)
        return True

    def _build_refine_job(self) -> Any:
        from dataclasses import replace

        from napari_fewlabel.models.checkpoint import read_card

        layer = self._prediction_layer
        if self._checkpoint is None or layer is None or layer not in self.viewer.layers:
            raise FewLabelError(
                "Nothing to refine yet: press Start (or Predict with model), correct the "
                "prediction on a few slices, then Refine."
            )
        labels = self.selected_labels()
        if labels is None:
            raise FewLabelError(
                "Choose the annotation layer in '2. Annotation': Refine adds the corrected "
                "slices to it."
            )
        card = read_card(self._checkpoint)
        axis = card.slice_axis
        self._refine_axis = axis
        annotation = np.asarray(labels.data)
        prediction = np.asarray(layer.data)
        if annotation.shape != prediction.shape:
            raise FewLabelError(
                f"The annotation layer has shape {annotation.shape} but the prediction has "
                f"{prediction.shape}: choose the annotation of this scan in '2. Annotation'."
            )
        shown = self._shown_prediction if self._shown_prediction is not None else prediction
        corrected = corrected_slices(shown, prediction, axis)
        had = set(labelled_slices(annotation, axis).tolist())
        adopted = [int(i) for i in corrected if int(i) not in had]
        trained = set(card.training.get("data", {}).get("labelled_slices", []))
        trained |= set(card.training.get("data", {}).get("empty_slices", []))
        marked_axis, empty = marked_empty(labels)
        now = had | set(adopted) | (set(empty) if marked_axis == axis else set())
        if trained and now <= trained:
            raise FewLabelError(
                "Nothing new to learn from: correct the prediction on a slice (or paint a slice "
                "of the annotation, or mark one empty), then Refine."
            )
        if adopted:
            index = np.zeros(annotation.shape, bool)
            sl: list[Any] = [slice(None)] * 3
            sl[axis] = adopted
            index[tuple(sl)] = True
            labels.data_setitem(np.nonzero(index), prediction[index])  # undoable, like a brush
            self._update_slice_count()
        job = self._build_job()
        steps = refine_steps(self.steps_spin.value())
        return replace(job, model=str(self._checkpoint), steps=steps, axis=axis)

    def _build_job(self) -> Any:
        from napari_fewlabel.train.finetune import FinetuneJob

        image = self.selected_image()
        if image is None:
            raise FewLabelError("Choose a scan in '1. Scan' (open one with File > Open).")
        labels = self.selected_labels()
        if labels is None:
            raise FewLabelError(
                "Choose an annotation layer in '2. Annotation', or press 'New annotation layer' "
                "and paint a few slices."
            )
        volume = self._image_volume(image)
        data = np.asarray(labels.data)
        if data.shape != volume.shape:
            raise FewLabelError(
                f"The annotation layer has shape {data.shape} but the scan has {volume.shape}: "
                "use 'New annotation layer' so the labels match the scan voxel for voxel."
            )
        if not data.any():
            raise FewLabelError(
                "No labelled slice: paint at least one slice of the annotation layer "
                "(two or more, spread over the volume, give better results)."
            )
        axis, empty = marked_empty(labels)
        if empty:
            painted_axis = infer_slice_axis(data).axis
            if painted_axis != axis:
                raise FewLabelError(
                    f"The slices marked empty are {AXIS_NAMES[axis]} but the painted ones "
                    f"are {AXIS_NAMES[painted_axis]}: unmark them, or mark slices in the "
                    "orientation you painted."
                )
            check_empty_slices(data, axis, empty)  # painted over since they were marked?
        minutes = self.minutes_spin.value()
        self._job_image = image
        return FinetuneJob(
            image=volume,
            labels=data.astype(np.int64, copy=False) if data.dtype.kind == "i" else data,
            out=self._workdir / f"model-{time.strftime('%Y%m%d-%H%M%S')}.safetensors",
            classes=self.current_classes(max_label=int(data.max())),
            model=self._selected_model(),
            axis=axis if empty else None,
            empty_slices=tuple(empty),
            steps=self.steps_spin.value(),
            time_budget_s=60.0 * minutes if minutes else None,
            device=self.device_combo.currentText(),
            preview_every_s=self.preview_every_s,
        )

    def predict_with_selected_model(self) -> bool:
        """Segment the selected scan with the selected model (no training)."""
        if self.runner.is_running:
            show_warning("A job is already running: wait for it or press Stop.")
            return False
        image = self.selected_image()
        model = self._model_to_predict_with()
        if image is None or model is None:
            show_error(
                "Choose a scan and a model ('Start from', or 'From file...') to predict with."
            )
            return False
        try:
            volume = self._image_volume(image)
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        self._job_image = image
        self._start_job(
            "predict", predict_with_model, model, volume, self.device_combo.currentText()
        )
        self.status.setText(f"Predicting with {Path(model).name}...")
        self.progress.setRange(0, 0)  # busy indicator
        return True

    def predict_all_open_scans(self) -> bool:
        """Segment every open scan with the selected model, one after another; False if refused.

        The scans are the image layers '1. Scan' offers; one that is not a 3D scan
        (a 2D picture, an RGB image) is named in a notification and left out, and
        one whose prediction fails is notified while the others go on. Each
        prediction appears as its "<scan> prediction" layer as soon as it is done;
        the per-class volumes of all of them are shown at the end.
        """
        if self.runner.is_running:
            show_warning("A job is already running: wait for it or press Stop.")
            return False
        model = self._model_to_predict_with()
        if model is None:
            show_error(
                "Choose a model ('Start from', or 'From file...'), or fine-tune one first, "
                "to predict the open scans with."
            )
            return False
        scans: list[tuple[str, Volume]] = []
        layers: list[Image] = []
        left_out = 0
        for layer in self._scan_layers():
            try:
                scans.append((layer.name, self._scan_volume(layer)))
            except FewLabelError as exc:
                show_warning(f"'{layer.name}' is left out: {exc}")
                left_out += 1
                continue
            layers.append(layer)
        if not scans:
            show_error("No 3D scan is open: open one or more scans (File > Open), then predict.")
            return False
        self._batch_layers, self._batch_volumes = layers, []
        self._batch_failed, self._batch_left_out, self._batch_end = 0, left_out, None
        self._batch_scan = None
        self._start_job("predict_all", predict_scans, model, scans, self.device_combo.currentText())
        self.status.setText(f"Predicting {len(scans)} scan(s) with {Path(model).name}...")
        self.progress.setFormat("%v / %m scans")
        self.progress.setRange(0, len(scans))
        self.progress.setValue(0)
        return True

    def _on_predict_all_clicked(self) -> None:
        if self.runner.is_running and self._job_kind == "predict_all":
            self.stop()
        else:
            self.predict_all_open_scans()

    def _scan_layers(self) -> list[Image]:
        """The image layers '1. Scan' lists (not the widget's own layers), in layer order."""
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and not layer.metadata.get(PREVIEW_KEY)
            and not layer.metadata.get(PREDICTION_KEY)
        ]

    def _scan_volume(self, image: Image) -> Volume:
        """``image`` as a scan to predict: the modality chosen in '1. Scan' for the selected
        scan, the detected one for the others (the choice where none was detected)."""
        if image.rgb or image.multiscale:
            raise FewLabelError(
                f"it is {'an RGB picture' if image.rgb else 'a multiscale image'}, not a scan: "
                "open the scan itself (NIfTI, NRRD, MHA or a DICOM folder)."
            )
        if image is self.selected_image():
            return self._image_volume(image)
        volume = volume_from_layer(np.asarray(image.data), layer_meta(image), what="image layer")
        if volume.modality in ("CT", "MR"):
            return volume
        modality = self.modality_combo.currentText()
        return volume.with_array(volume.array, modality=modality)  # type: ignore[arg-type]

    def label_next(self) -> bool:
        """Show the unlabelled slice the model is least sure of; False (notified) if refused.

        The first press ranks the slices with the model in a child process (one pass
        over the volume); later presses with the same model step through that ranking,
        skipping slices painted or marked empty since.
        """
        from napari_fewlabel.models.checkpoint import read_card
        from napari_fewlabel.models.registry import resolve_model

        if self.runner.is_running:
            show_warning("A job is already running: wait for it or press Stop.")
            return False
        image = self.selected_image()
        model = self._model_to_predict_with()
        if image is None or model is None:
            show_error(
                "No model to ask yet: fine-tune first (Start), or choose a fine-tuned model in "
                "'Start from'; Label next shows where that model is least sure."
            )
            return False
        try:
            checkpoint = resolve_model(model)
            axis = read_card(checkpoint).slice_axis
            volume = self._image_volume(image)
            exclude = self._labelled_along(axis, volume.shape)
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        ranked = self._suggestions
        if ranked is not None and ranked.checkpoint == checkpoint:
            left = [s for s in ranked.slices if s.index not in exclude]
            if left:
                self._show_suggestion(left[0], len(ranked.slices) - len(left) + 1, image)
                return True
        self._job_image = image
        self._start_job(
            "suggest",
            suggest_next_slices,
            checkpoint,
            volume,
            sorted(exclude),
            self.device_combo.currentText(),
        )
        self.status.setText(f"Ranking the unlabelled slices with {checkpoint.name}...")
        self.progress.setRange(0, 0)
        return True

    def _labelled_along(self, axis: int, shape: tuple[int, ...]) -> set[int]:
        """Slices along ``axis`` the annotation layer has painted or marked empty."""
        labels = self.selected_labels()
        if labels is None:
            return set()
        data = np.asarray(labels.data)
        if data.shape != shape:
            raise FewLabelError(
                f"The annotation layer has shape {data.shape} but the scan has {shape}: choose "
                "the annotation drawn on this scan in '2. Annotation'."
            )
        marked_axis, empty = marked_empty(labels)
        done = set(labelled_slices(data, axis).tolist())
        return done | set(empty) if marked_axis == axis else done

    def _on_suggested(self, event: SlicesSuggested) -> None:
        self._suggestions = event
        image = self._job_image
        if not event.slices:
            self.status.setText("Every slice is labelled or marked empty: nothing left to suggest.")
            show_info(self.status.text())
            return
        if image is None or image not in self.viewer.layers:
            show_warning("The scan was closed before the ranking arrived; nothing to show.")
            return
        self._show_suggestion(event.slices[0], 1, image)

    def _show_suggestion(self, pick: SliceScore, rank: int, image: Image) -> None:
        """Move the 2D view to ``pick``'s slice (in its orientation) and say why it was chosen."""
        dims = self.viewer.dims
        world_axis = pick.axis + dims.ndim - image.ndim
        if dims.ndisplay != 2:
            dims.ndisplay = 2
        if world_axis in dims.displayed:
            dims.order = (world_axis, *(a for a in dims.order if a != world_axis))
        point = np.asarray(image.world_to_data(dims.point[-image.ndim :]), dtype=float)
        point[pick.axis] = pick.index
        dims.set_point(world_axis, float(image.data_to_world(point)[pick.axis]))
        labels = self.selected_labels()
        if labels is not None:
            self.viewer.layers.selection.active = labels
        total = len(self._suggestions.slices) if self._suggestions is not None else rank
        self.status.setText(
            f"Label slice {pick.index} ({AXIS_NAMES[pick.axis]}) next: rank {rank} of {total}, "
            f"the two streams disagree on {pick.disagreement} voxels there. Paint it (or mark "
            "it empty), press Label next for the next one, then Start again."
        )
        show_info(self.status.text())

    def _model_to_predict_with(self) -> str | None:
        """The model chosen in 'Start from', else the one fine-tuned in this session."""
        selected = self._selected_model()
        if selected is not None and selected != RANDOM_INIT:
            return selected
        return None if self._checkpoint is None else str(self._checkpoint)

    def _start_job(self, kind: str, target: Any, *args: Any) -> None:
        self._job_kind = kind
        self._job_failed = False
        self.plot.clear()
        self.runner.start(target, *args)
        self.start_button.setText("Stop")
        self.predict_button.setEnabled(False)
        self.next_button.setEnabled(False)
        if kind == "predict_all":
            self.predict_all_button.setText("Stop")
        else:
            self.predict_all_button.setEnabled(False)
        if kind in ("finetune", "refine"):
            self._follow_slice_on_screen(True)
            if self.preview_every_s >= 0:
                self._open_preview_layer()

    def _open_preview_layer(self) -> None:
        """Add the empty "<scan> preview" layer now, while the click is being answered.

        Adding a Labels layer costs napari 0.2-0.5 s on the GUI thread; done at
        the first preview, that froze the window in the middle of training.
        """
        image = self._job_image
        if image is not None and image in self.viewer.layers:
            self._preview_layer = self._add_preview_layer(image)
            self._preview_shown = None

    def stop(self) -> None:
        """Stop training (kept: the weights so far, then a prediction with them).

        Predicting all open scans stops at the next batch of slices; the scans
        done so far keep their prediction layers.
        """
        if self._job_kind == "predict_all":
            self._stop_then_cancel(self.start_button, self.status, "prediction", "batch of slices")
            if self.runner.is_running:  # a second press has ended it: the buttons are reset
                self.predict_all_button.setText(self.start_button.text())
            return
        self._stop_then_cancel(self.start_button, self.status, "prediction", "step")

    # ------------------------------------------------------------ events
    def _on_event(self, event: Any) -> None:
        if isinstance(event, Progress):
            self._show_progress(event, self.progress, self.status, self.plot)
        elif isinstance(event, Notice):
            (show_warning if event.level == "warning" else show_info)(event.message)
            self.status.setText(event.message)
        elif isinstance(event, Preview):
            self._show_preview(event)
        elif isinstance(event, Done):
            self._end_preview()
            self._checkpoint = event.checkpoint
            self.save_model_button.setEnabled(event.checkpoint is not None)
            self.start_button.setText("Cancel prediction")
            what = "Stopped" if event.cancelled else "Fine-tuning done"
            dice = event.summary.get("val_dice")
            self.status.setText(
                f"{what}{f' (validation Dice {dice:.3f})' if isinstance(dice, float) else ''}; "
                "predicting the whole volume..."
            )
            self.progress.setRange(0, 0)
        elif isinstance(event, SegmentationReady):
            self._show_prediction(event)
        elif isinstance(event, SlicesSuggested):
            self._on_suggested(event)
        elif isinstance(event, PredictionProgress):
            if self._job_kind != "predict_all":
                self._show_prediction_progress(event, self.progress)
            elif self._batch_scan is not None and not self.start_button.text().startswith(
                "Cancel"
            ):  # the bar counts scans; the status line says how far this one is
                number, total, name = self._batch_scan
                self.status.setText(
                    f"Predicting scan {number} of {total}: {name} ({event.percent}%)..."
                )
        elif isinstance(event, ScanStarted):
            self._batch_scan = (event.number, event.total, event.name)
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.number - 1)
            if not self.start_button.text().startswith("Cancel"):  # not while stopping
                self.status.setText(
                    f"Predicting scan {event.number} of {event.total}: {event.name}..."
                )
        elif isinstance(event, ScanSegmented):
            self._show_scan_prediction(event)
        elif isinstance(event, ScanFailed):
            self._batch_failed += 1
            if event.user_error:
                show_error(f"'{event.name}' was not predicted (the others go on): {event.message}")
            else:
                show_error(
                    f"Predicting '{event.name}' failed unexpectedly: {event.message} (details "
                    "in the terminal)."
                )
        elif isinstance(event, ScansPredicted):
            self._batch_end = event

    # ------------------------------------------------------------ live preview
    def _follow_slice_on_screen(self, on: bool) -> None:
        """Tell the running job which slice is shown, now and whenever the view changes."""
        if on == self._following_view:
            return
        self._following_view = on
        events = self.viewer.dims.events
        for emitter in (events.current_step, events.ndisplay, events.order):
            if on:
                emitter.connect(self._send_slice_on_screen)
            else:
                emitter.disconnect(self._send_slice_on_screen)
        if on:
            self._send_slice_on_screen()

    def _send_slice_on_screen(self, *_: Any) -> None:
        image = self._job_image
        where = None
        if image is not None and image in self.viewer.layers:
            where = slice_on_screen(self.viewer, image)
        if where is None:
            self.runner.show_slice(None)
        else:
            self.runner.show_slice(*where)

    def _show_preview(self, event: Preview) -> None:
        """Copy the previewed slices into the "<scan> preview" layer (the last ones cleared)."""
        image = self._job_image
        if image is None or image not in self.viewer.layers:
            return
        if self._preview_layer is None or self._preview_layer not in self.viewer.layers:
            self._open_preview_layer()  # the user removed it: back it comes
        layer = self._preview_layer
        assert layer is not None
        data = np.asarray(layer.data)
        if self._preview_shown is not None:
            axis, start, n = self._preview_shown
            np.moveaxis(data, axis, 0)[start : start + n] = 0
        n = len(event.labels)
        np.moveaxis(data, event.axis, 0)[event.start : event.start + n] = event.labels
        self._preview_shown = (event.axis, event.start, n)
        layer.refresh()

    def _add_preview_layer(self, image: Image) -> Labels:
        volume = self._image_volume(image)
        data, kwargs, _ = labels_layer_data(
            np.zeros(volume.shape, dtype=np.uint8),
            volume,
            f"{image.name} preview",
            self._preview_classes,
        )
        kwargs["metadata"][PREDICTION_KEY] = True
        kwargs["metadata"][PREVIEW_KEY] = True
        kwargs["opacity"] = 0.5
        # Adding a layer selects it; keep the user's selection (they may be painting).
        selection = self.viewer.layers.selection
        before, active = set(selection), selection.active
        layer = self.viewer.add_labels(data, **kwargs)
        selection.clear()
        selection.update(before)
        selection.active = active
        return layer

    def _end_preview(self) -> None:
        """Training is over: stop following the view, and remove the preview layer."""
        self._follow_slice_on_screen(False)
        layer, self._preview_layer = self._preview_layer, None
        self._preview_shown = None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _show_prediction(self, event: SegmentationReady) -> None:
        image = self._job_image
        if image is None or image not in self.viewer.layers:
            show_warning("The scan was closed before its prediction arrived; nothing to show.")
            return
        volume = self._image_volume(image)
        layer = show_prediction(self.viewer, f"{image.name} prediction", volume, event)
        self._prediction_layer = layer
        self._shown_prediction = np.array(layer.data, copy=True)
        self._checkpoint = event.checkpoint
        self.export_button.setEnabled(True)
        self.save_model_button.setEnabled(True)
        self.refine_button.setEnabled(True)
        summary = class_volumes_text(event.labels, event.classes, volume.spacing_mm)
        hint = (
            " Wrong somewhere? Correct a few slices (or press Label next), then Refine; a "
            "slice with none of the structures: show it and press 'Mark slice empty'."
            if self._job_kind in ("finetune", "refine")
            else ""
        )
        self.status.setText(f"Prediction ready: {summary}.{hint}")

    def _show_scan_prediction(self, event: ScanSegmented) -> None:
        """Predict all: show one scan's prediction beside it, as a single prediction is shown."""
        layers = self._batch_layers
        image = layers[event.number - 1] if 0 < event.number <= len(layers) else None
        if image is None or image not in self.viewer.layers:
            show_warning(f"'{event.name}' was closed before its prediction arrived; not shown.")
            return
        try:
            volume = self._scan_volume(image)
        except FewLabelError as exc:  # the layer was changed meanwhile
            show_warning(f"The prediction of '{event.name}' is not shown: {exc}")
            return
        result = event.result
        layer = show_prediction(self.viewer, f"{image.name} prediction", volume, result)
        self._checkpoint = result.checkpoint
        kept = self._prediction_layer
        if image is self.selected_image() or kept is None or kept not in self.viewer.layers:
            # Refine works on the prediction of the scan chosen in '1. Scan'.
            self._prediction_layer = layer
            self._shown_prediction = np.array(layer.data, copy=True)
            self.refine_button.setEnabled(True)
        self.export_button.setEnabled(True)
        self.save_model_button.setEnabled(True)
        volumes = class_volumes_text(result.labels, result.classes, volume.spacing_mm)
        self._batch_volumes.append(f"{image.name}: {volumes}")
        self.progress.setValue(event.number)

    def _show_batch_summary(self) -> None:
        """Predict all is over: how many scans, and each one's class volumes (mL)."""
        end = self._batch_end
        done = len(self._batch_volumes)
        total = end.total if end is not None else len(self._batch_layers)
        stopped = end.stopped if end is not None else True  # no end event: cancelled
        text = f"{'Stopped: predicted' if stopped else 'Predicted'} {done} of {total} scan(s)"
        notes = []
        if self._batch_failed:
            notes.append(f"{self._batch_failed} failed")
        if self._batch_left_out:
            notes.append(f"{self._batch_left_out} layer(s) left out, not 3D scans")
        if notes:
            text += f" ({'; '.join(notes)}: see the notifications)"
        text += (": " + "; ".join(self._batch_volumes) if done else "") + "."
        self.status.setText(text)
        show_info(text)

    def _on_failed(self, failure: JobFailed) -> None:
        self._job_failed = True
        self.status.setText(notify_failure(failure, "The job"))

    def _on_finished(self) -> None:
        self._end_preview()
        if self._job_kind == "predict_all" and not self._job_failed:
            self._show_batch_summary()
        self.start_button.setText("Start")
        self.predict_button.setEnabled(True)
        self.next_button.setEnabled(True)
        self.predict_all_button.setText(PREDICT_ALL)
        self.predict_all_button.setEnabled(True)
        self.progress.setFormat("%v / %m steps")
        self.progress.setRange(0, max(self.progress.maximum(), 1))

    # ------------------------------------------------------------ results
    def _ask_save_model(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save model", "model.safetensors", "Models (*.safetensors)"
        )
        if path:
            self.save_model(Path(path))

    def save_model(self, path: Path) -> Path | None:
        """Write the last model to ``path``: weights and card, without the optimizer state.

        The job's own checkpoint also keeps the optimizer's moments (to resume a
        run); a model to keep or share does not need them (a third of the size).
        """
        from napari_fewlabel.models.checkpoint import save_model_copy

        if self._checkpoint is None or not self._checkpoint.exists():
            show_error("No model yet: fine-tune first (Start), then save.")
            return None
        try:
            path = save_model_copy(self._checkpoint, path)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        show_info(f"Model saved to {path}")
        return path

    def _ask_save_annotation(self) -> None:
        labels = self.selected_labels()
        default = f"{labels.name}.nii.gz" if labels is not None else "annotation.nii.gz"
        path, _ = QFileDialog.getSaveFileName(
            self, "Save annotation", default, "NIfTI (*.nii.gz *.nii)"
        )
        if path:
            self.save_annotation(Path(path))

    def save_annotation(self, path: Path) -> Path | None:
        """Write the annotation layer as NIfTI on the scan's grid, with classes and marks.

        The classes are those chosen in the widget (what training would use);
        reopening the file (File > Open) gives back the layer, its classes and
        the slices marked empty.
        """
        from dataclasses import replace

        labels = self.selected_labels()
        if labels is None:
            show_error("No annotation layer to save: press 'New annotation layer' and paint.")
            return None
        data = np.asarray(labels.data)
        classes = self.current_classes(max_label=int(data.max(initial=0)))
        info = replace(mask_info_of(labels.metadata), classes=tuple(c.to_dict() for c in classes))
        try:
            like = volume_from_layer(data, layer_meta(labels), what="annotation layer")
            written = save_labels(data, like=like, path=path, info=info)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        labels.metadata[CLASSES_KEY] = [dict(c) for c in info.classes]
        show_info(f"Annotation saved to {written} (File > Open brings it back).")
        return written

    def _ask_export_mask(self) -> None:
        layer = self._prediction_to_export()
        # DICOM SEG is offered for a scan read from a DICOM series (it references its files).
        filters = [
            NIFTI_FILTER,
            *([SEG_FILTER] if layer is not None and _from_dicom(layer) else []),
        ]
        path, chosen = QFileDialog.getSaveFileName(
            self, "Export mask", "mask.nii.gz", ";;".join(filters)
        )
        if path:
            self.export_mask(_with_suffix_of_filter(Path(path), chosen))

    def _prediction_to_export(self) -> Labels | None:
        """The prediction layer selected in the layer list, else the last one shown."""
        active = self.viewer.layers.selection.active
        if (
            isinstance(active, Labels)
            and active.metadata.get(PREDICTION_KEY)
            and not active.metadata.get(PREVIEW_KEY)
        ):
            return active
        layer = self._prediction_layer
        return layer if layer is not None and layer in self.viewer.layers else None

    def export_mask(self, path: Path) -> Path | None:
        """Write a prediction layer on its scan's own voxel grid; the suffix picks the format.

        ``.dcm``: a DICOM SEG of the scan's source series, with the model card's
        classes as segments (a scan read from a DICOM folder only: otherwise the
        notification says to export NIfTI, and nothing is written); anything
        else: NIfTI. The layer is the prediction selected in the layer list, else
        the last one shown.
        """
        from napari_fewlabel.io.dicom_seg import SEG_SUFFIX

        layer = self._prediction_to_export()
        if layer is None:
            show_error("No prediction to export yet: press Start (or Predict with model) first.")
            return None
        seg = Path(path).suffix.lower() == SEG_SUFFIX
        try:
            data = np.asarray(layer.data)
            like = volume_from_layer(data, layer_meta(layer), what="prediction")
            if seg:
                written = self._write_seg(data, like, Path(path), layer)
            else:
                info = mask_info_of(layer.metadata)
                written = save_labels(data, like=like, path=path, info=info)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        show_info(f"{'DICOM SEG' if seg else 'Mask'} saved to {written}")
        return written

    def _write_seg(self, data: np.ndarray, like: Volume, path: Path, layer: Labels) -> Path:
        from napari_fewlabel.io.dicom_seg import write_dicom_seg

        classes = layer.metadata.get(CLASSES_KEY) or [
            c.to_dict() for c in self.current_classes(max_label=int(data.max(initial=0)))
        ]
        return write_dicom_seg(data, like=like, path=path, classes=classes)


def class_volumes_text(
    labels: np.ndarray,
    classes: tuple[SegmentationClass, ...],
    spacing_mm: tuple[float, float, float],
) -> str:
    """``"liver 1520.3 mL, tumour 12.0 mL"``: each foreground class's volume in ``labels``."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=len(classes))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    return ", ".join(f"{c.name} {counts[c.index] * voxel_ml:.1f} mL" for c in classes[1:])


def _from_dicom(layer: Labels) -> bool:
    """Whether ``layer`` lies on a scan read from a DICOM series."""
    header = layer.metadata.get(METADATA_KEY, {}).get("header", {})
    return bool(header.get("format") == "DICOM")


def _with_suffix_of_filter(path: Path, chosen: str) -> Path:
    """``path`` ending as the file dialog's chosen filter asks (Qt adds no suffix itself)."""
    if chosen != SEG_FILTER or path.suffix.lower() == ".dcm":
        return path
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".dcm")


def marked_empty(labels: Labels) -> tuple[int, list[int]]:
    """(axis, slices) an annotation layer has marked empty; ``(0, [])`` when none."""
    info = mask_info_of(labels.metadata)
    return info.empty_axis, list(info.empty_slices)


def _listed(slices: list[int], at_most: int = 12) -> str:
    return ", ".join(map(str, slices[:at_most])) + (" ..." if len(slices) > at_most else "")
