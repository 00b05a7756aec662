"""The "Lungs and emphysema" dock widget for chest CT.

1. Chest CT: which image layer, and the low-attenuation threshold (-950 HU).
2. Measure: lung masks (right/left) and the low-attenuation mask as Labels
   layers, and the scores table (volume, %LAA, %LAA-910, Perc15 for both
   lungs, each lung and the upper/middle/lower thirds); Export table...
   writes CSV or JSON.
3. Emphysema subtypes: paint a few regions (normal lung, centrilobular,
   paraseptal, panlobular) on a subtype layer, Start: a classifier on DrasCLR
   patch features is trained on them and slid over the lungs; the
   "Emphysema subtypes (<CT>)" layer and the share of lung volume per subtype.

Both run in a child process (``_runner.ProcessRunner``), so napari stays
responsive on a 512 x 512 x 600 CT; Cancel/Stop end them (Stop keeps the
subtype classifier trained so far and still maps).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from napari_fewlabel.data.classes import EMPHYSEMA_SUBTYPES, SegmentationClass
from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.emphysema import (
    LAA_THRESHOLD_HU,
    EmphysemaReport,
    low_attenuation_classes,
)
from napari_fewlabel.infer.lungs import LUNG_CLASSES
from napari_fewlabel.io import METADATA_KEY, Volume
from napari_fewlabel.jobs import (
    EmphysemaReady,
    SubtypesReady,
    measure_emphysema,
    train_and_map_subtypes,
)
from napari_fewlabel.napari._job_widget import JobWidget
from napari_fewlabel.napari._layers import (
    PREDICTION_KEY,
    labels_layer_data,
    layer_meta,
    volume_from_layer,
)
from napari_fewlabel.napari._plot import LinePlot
from napari_fewlabel.napari._runner import JobFailed, notify_failure
from napari_fewlabel.train.events import Done, Notice, Progress

if TYPE_CHECKING:
    import napari

#: Table columns: (header, key in EmphysemaReport.to_table(), digits).
COLUMNS = (
    ("region", "region", None),
    ("volume (mL)", "lung_volume_ml", 1),
    ("%LAA", "laa_percent", 2),
    ("%LAA-910", "laa_910_percent", 2),
    ("Perc15 (HU)", "perc15_hu", 0),
)
RANDOM_ENCODER = "random encoder (no pretraining)"
#: layer.metadata key of a subtype-regions layer: the name of the CT it was painted on.
REGIONS_OF_KEY = "fewlabel_subtype_regions_of"
FROM_FILE = "From file..."


class EmphysemaWidget(JobWidget):
    """Lung masks and %LAA-950 of a chest CT, as layers and a table."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, scratch_prefix="fewlabel-emphysema-")
        self.report: EmphysemaReport | None = None
        self._job_image: Image | None = None
        self._job_kind = ""
        self._subtype_model: Path | None = None

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_scan_box())
        layout.addWidget(self._build_measure_box())
        layout.addWidget(self._build_subtypes_box())
        layout.addStretch(1)
        self._follow_layers()

    # ------------------------------------------------------------ layout
    def _build_scan_box(self) -> QGroupBox:
        box = QGroupBox("1. Chest CT")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(-1024.0, -500.0)
        self.threshold_spin.setDecimals(0)
        self.threshold_spin.setValue(LAA_THRESHOLD_HU)
        self.threshold_spin.setSuffix(" HU")
        self.threshold_spin.setToolTip("Lung voxels strictly below this count as low attenuation.")
        form.addRow("CT", self.image_combo)
        form.addRow("LAA threshold", self.threshold_spin)
        return box

    def _build_measure_box(self) -> QGroupBox:
        box = QGroupBox("2. Lungs and %LAA")
        layout = QVBoxLayout(box)
        self.measure_button = QPushButton("Measure")
        self.measure_button.clicked.connect(self._on_measure_cancel)
        self.status = QLabel("Open a chest CT, then press Measure.")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c[0] for c in COLUMNS])
        self.table.verticalHeader().setVisible(False)  # type: ignore[union-attr]
        self.table.setMinimumHeight(200)
        self.export_button = QPushButton("Export table...")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(self._ask_export)
        layout.addWidget(self.measure_button)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        layout.addWidget(self.export_button)
        return box

    def _build_subtypes_box(self) -> QGroupBox:
        from napari_fewlabel.train.subtypes import DEFAULT_STEPS

        box = QGroupBox("3. Emphysema subtypes")
        form = QFormLayout(box)
        self.regions_combo = QComboBox()
        self.new_regions_button = QPushButton("New subtype layer")
        self.new_regions_button.clicked.connect(self.new_subtype_layer)
        self.encoder_combo = QComboBox()
        self.encoder_combo.addItem(RANDOM_ENCODER, None)
        self.encoder_combo.addItem(FROM_FILE, FROM_FILE)
        self.encoder_combo.activated.connect(self._on_encoder_activated)
        self.device_combo = self._device_combo()
        self.subtype_steps = QSpinBox()
        self.subtype_steps.setRange(10, 100_000)
        self.subtype_steps.setValue(DEFAULT_STEPS)
        self.subtype_steps.setSuffix(" steps")
        self.other_cts_check = QCheckBox("Also learn from the regions painted on other open CTs")
        self.other_cts_check.setToolTip(
            "Subtype layers made with 'New subtype layer' on other CTs join the training; "
            "the map is made for the CT chosen in 1."
        )
        self.subtype_button = QPushButton("Start")
        self.subtype_button.clicked.connect(self._on_subtype_start_stop)
        self.subtype_progress = QProgressBar()
        self.subtype_progress.setFormat("%v / %m steps")
        self.subtype_status = QLabel(
            "Paint a few regions of each subtype you see (and of normal lung), then Start."
        )
        self.subtype_status.setWordWrap(True)
        self.subtype_plot = LinePlot(unit_range=("accuracy",))
        self.subtype_table = QTableWidget(len(EMPHYSEMA_SUBTYPES) - 1, 2)
        self.subtype_table.setHorizontalHeaderLabels(["subtype", "% of lung"])
        self.subtype_table.verticalHeader().setVisible(False)  # type: ignore[union-attr]
        for r, cls in enumerate(EMPHYSEMA_SUBTYPES[1:]):
            self.subtype_table.setItem(r, 0, QTableWidgetItem(cls.name))
            self.subtype_table.setItem(r, 1, QTableWidgetItem("-"))
        regions = QHBoxLayout()
        regions.addWidget(self.regions_combo, 1)
        regions.addWidget(self.new_regions_button)
        form.addRow("Regions", regions)
        form.addRow("", self.other_cts_check)
        form.addRow("Encoder", self.encoder_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("In use", self.device_label)
        form.addRow("Budget", self.subtype_steps)
        form.addRow(self.subtype_button)
        form.addRow(self.subtype_progress)
        form.addRow(self.subtype_status)
        form.addRow(self.subtype_plot)
        form.addRow(self.subtype_table)
        return box

    # ------------------------------------------------------------ layers
    def _refresh_layers(self, *_: Any) -> None:
        current = self.image_combo.currentData()
        self.image_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                modality = layer.metadata.get(METADATA_KEY, {}).get("modality", "unknown")
                if modality != "MR":
                    self.image_combo.addItem(layer.name, layer)
        index = self.image_combo.findData(current) if current is not None else -1
        if index >= 0:
            self.image_combo.setCurrentIndex(index)
        current = self.regions_combo.currentData()
        self.regions_combo.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and not layer.metadata.get(PREDICTION_KEY):
                self.regions_combo.addItem(layer.name, layer)
        index = self.regions_combo.findData(current) if current is not None else -1
        if index >= 0:
            self.regions_combo.setCurrentIndex(index)

    def selected_image(self) -> Image | None:
        layer = self.image_combo.currentData()
        return layer if layer in self.viewer.layers else None

    def selected_regions(self) -> Labels | None:
        layer = self.regions_combo.currentData()
        return layer if layer in self.viewer.layers else None

    def new_subtype_layer(self) -> Labels | None:
        """A Labels layer on the CT's grid, coloured by subtype, ready to paint."""
        image = self.selected_image()
        if image is None:
            show_error("Open a chest CT first (File > Open), then add a subtype layer.")
            return None
        try:
            volume = self._volume(image)
        except FewLabelError as exc:
            show_error(str(exc))
            return None
        data, kwargs, _ = labels_layer_data(
            np.zeros(volume.shape, np.uint8),
            volume,
            f"{image.name} subtype regions",
            EMPHYSEMA_SUBTYPES,
        )
        kwargs["metadata"][REGIONS_OF_KEY] = image.name
        layer = self.viewer.add_labels(data, **kwargs)
        layer.selected_label = 1
        layer.mode = "paint"
        layer.brush_size = 8
        self.regions_combo.setCurrentIndex(self.regions_combo.findData(layer))
        self.viewer.layers.selection.active = layer
        names = ", ".join(f"{c.index} {c.name}" for c in EMPHYSEMA_SUBTYPES[1:])
        show_info(f"Paint a few small regions with the label values {names}; then press Start.")
        return layer

    def _on_encoder_activated(self, index: int) -> None:
        if self.encoder_combo.itemData(index) != FROM_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a DrasCLR encoder", "", "Models (*.safetensors)"
        )
        if path:
            self.add_encoder_file(Path(path))
        else:
            self.encoder_combo.setCurrentIndex(0)

    def add_encoder_file(self, path: Path) -> None:
        """Put a DrasCLR encoder (``fewlabel pretrain --method drasclr``) in the list, selected."""
        self.encoder_combo.insertItem(1, path.name, str(path))
        self.encoder_combo.setCurrentIndex(1)

    def _volume(self, layer: Image) -> Volume:
        volume = volume_from_layer(np.asarray(layer.data), layer_meta(layer), what="image layer")
        return volume.with_array(volume.array, modality="CT")

    # ------------------------------------------------------------ run
    def _on_measure_cancel(self) -> None:
        if self.runner.is_running:
            self.runner.shutdown(timeout_s=0.5)
            self.status.setText("Cancelled.")
        else:
            self.measure()

    def measure(self) -> bool:
        """Start the measurement; False (with a notification) if refused."""
        if self.runner.is_running:
            show_warning("A measurement is already running: wait for it or press Cancel.")
            return False
        image = self.selected_image()
        if image is None:
            show_error("Open a chest CT first (File > Open), then press Measure.")
            return False
        try:
            volume = self._volume(image)
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        self._job_image = image
        self._job_kind = "measure"
        self.runner.start(measure_emphysema, volume, float(self.threshold_spin.value()))
        self.measure_button.setText("Cancel")
        self.status.setText("Segmenting the lungs...")
        return True

    def _on_subtype_start_stop(self) -> None:
        if not self.runner.is_running:
            self.start_subtypes()
        elif self._job_kind != "subtypes":
            show_warning("A measurement is running: wait for it or press Cancel.")
        else:
            self._stop_then_cancel(self.subtype_button, self.subtype_status, "mapping", "step")

    def start_subtypes(self) -> bool:
        """Train on the painted regions and map the subtypes; False (notified) if refused."""
        from napari_fewlabel.train.subtypes import SubtypeJob

        if self.runner.is_running:
            show_warning("A job is already running: wait for it or stop it first.")
            return False
        image, regions = self.selected_image(), self.selected_regions()
        try:
            if image is None:
                raise FewLabelError("Open a chest CT first (File > Open).")
            if regions is None:
                raise FewLabelError(
                    "Choose the layer with the painted subtype regions, or press 'New subtype "
                    "layer' and paint a few regions of each subtype you see."
                )
            volume = self._volume(image)
            data = np.asarray(regions.data)
            if data.shape != volume.shape:
                raise FewLabelError(
                    f"The subtype layer has shape {data.shape} but the CT has {volume.shape}: "
                    "use 'New subtype layer' so the regions match the CT voxel for voxel."
                )
        except FewLabelError as exc:
            show_error(str(exc))
            return False
        others = self._other_painted_cts(image) if self.other_cts_check.isChecked() else []
        encoder = self.encoder_combo.currentData()
        job = SubtypeJob(
            scans=(volume, *(ct for ct, _ in others)),
            labels=(volume.with_array(data), *(lab for _, lab in others)),
            out=self._workdir / f"subtypes-{time.strftime('%Y%m%d-%H%M%S')}.safetensors",
            encoder=None if encoder in (None, FROM_FILE) else str(encoder),
            steps=self.subtype_steps.value(),
            device=self.device_combo.currentText(),
        )
        self._job_image = image
        self._job_kind = "subtypes"
        self.subtype_plot.clear()
        self.runner.start(train_and_map_subtypes, job, volume)
        self.subtype_button.setText("Stop")
        self.subtype_progress.setRange(0, job.steps)
        self.subtype_progress.setValue(0)
        self.subtype_status.setText("Starting (segmenting the lungs first)...")
        return True

    def _other_painted_cts(self, current: Image) -> list[tuple[Volume, Volume]]:
        """(CT, regions) of every other open CT with painted regions made by this widget."""
        pairs = []
        for layer in self.viewer.layers:
            name = layer.metadata.get(REGIONS_OF_KEY) if isinstance(layer, Labels) else None
            if name is None or name == current.name or name not in self.viewer.layers:
                continue
            ct = self.viewer.layers[name]
            data = np.asarray(layer.data)
            if isinstance(ct, Image) and data.shape == ct.data.shape and data.any():
                volume = self._volume(ct)
                pairs.append((volume, volume.with_array(data)))
        return pairs

    def _on_event(self, event: Any) -> None:
        status = self.subtype_status if self._job_kind == "subtypes" else self.status
        if isinstance(event, Notice):
            (show_warning if event.level == "warning" else show_info)(event.message)
            status.setText(event.message)
        elif isinstance(event, EmphysemaReady):
            self._show_report(event.report)
        elif isinstance(event, Progress):
            self._show_progress(
                event, self.subtype_progress, status, self.subtype_plot, losses_in_status=True
            )
        elif isinstance(event, Done):
            self._subtype_model = event.checkpoint
            self.subtype_button.setText("Cancel mapping")
            what = "Stopped" if event.cancelled else "Training done"
            status.setText(f"{what}; mapping the subtypes over the lungs...")
            self.subtype_progress.setRange(0, 0)
        elif isinstance(event, SubtypesReady):
            self._show_subtypes(event)

    def _show_subtypes(self, event: SubtypesReady) -> None:
        image = self._job_image
        if image is None or image not in self.viewer.layers:
            show_warning("The CT was closed before its subtype map arrived; nothing to show.")
            return
        volume = self._volume(image)
        self._put_labels(
            f"Emphysema subtypes ({image.name})", event.labels, volume, EMPHYSEMA_SUBTYPES, 0.5
        )
        for r, cls in enumerate(EMPHYSEMA_SUBTYPES[1:]):
            value = event.percent_of_lung.get(cls.name)
            text = "-" if value is None else f"{value:.1f}"
            self.subtype_table.setItem(r, 1, QTableWidgetItem(text))
        shares = ", ".join(
            f"{name} {value:.1f}%"
            for name, value in event.percent_of_lung.items()
            if value is not None
        )
        self.subtype_status.setText(f"Subtype map ready: {shares} of lung volume.")

    def _show_report(self, report: EmphysemaReport) -> None:
        image = self._job_image
        if image is None or image not in self.viewer.layers:
            show_warning("The CT was closed before its lungs arrived; nothing to show.")
            return
        volume = self._volume(image)
        self._put_labels(f"{image.name} lungs", report.lungs.labels, volume, LUNG_CLASSES)
        laa = report.low_attenuation.astype(np.uint8)
        laa_classes = low_attenuation_classes(report.threshold_hu)
        self._put_labels(
            f"{image.name} LAA{report.threshold_hu:g}", laa, volume, laa_classes, opacity=0.8
        )
        self.report = report
        self._fill_table(report)
        self.export_button.setEnabled(True)
        laa_text = "-" if report.laa_percent is None else f"{report.laa_percent:.2f}%"
        notes = []
        if report.lungs.lungs_were_split:
            notes.append("the lungs touched and were separated where they are thinnest")
        if not report.lungs.airway.any():
            notes.append("no trachea found in the field of view")
        self.status.setText(
            f"%LAA{report.threshold_hu:g} of both lungs: {laa_text}, lung volume "
            f"{report.lungs.volume_ml():.0f} mL" + (f" ({'; '.join(notes)})" if notes else "")
        )

    def _put_labels(
        self,
        name: str,
        data: np.ndarray,
        like: Volume,
        classes: tuple[SegmentationClass, ...],
        opacity: float = 0.4,
    ) -> None:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        array, kwargs, _ = labels_layer_data(data, like, name, classes)  # names saved too
        kwargs["metadata"][PREDICTION_KEY] = True
        kwargs["opacity"] = opacity
        self.viewer.add_labels(array, **kwargs)

    def _fill_table(self, report: EmphysemaReport) -> None:
        rows = report.to_table()
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, (_, key, digits) in enumerate(COLUMNS):
                value = row[key]
                if digits is None or not isinstance(value, int | float):
                    text = "-" if value is None else str(value)
                else:
                    text = f"{value:.{digits}f}"
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    def _on_failed(self, failure: JobFailed) -> None:
        if self._job_kind == "subtypes":
            self.subtype_status.setText(notify_failure(failure, "The subtype mapping"))
        else:
            self.status.setText(notify_failure(failure, "The measurement"))

    def _on_finished(self) -> None:
        self.measure_button.setText("Measure")
        self.subtype_button.setText("Start")
        self.subtype_progress.setRange(0, max(self.subtype_progress.maximum(), 1))

    # ------------------------------------------------------------ export
    def _ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export the scores", "emphysema.csv", "CSV (*.csv);;JSON (*.json)"
        )
        if path:
            self.export_table(Path(path))

    def export_table(self, path: Path) -> Path | None:
        """Write the scores as CSV (or JSON for a ``.json`` path), atomically."""
        if self.report is None:
            show_error("No scores yet: press Measure first.")
            return None
        path = Path(path)
        try:
            if path.suffix.lower() == ".json":
                written = self.report.write_json(path)
            else:
                written = self.report.write_csv(path.with_suffix(".csv"))
        except OSError as exc:
            show_error(f"Cannot write {path} ({exc.strerror}): choose a folder you can write to.")
            return None
        show_info(f"Scores saved to {written}")
        return written
