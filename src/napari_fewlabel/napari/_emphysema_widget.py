"""The "Lungs and emphysema" dock widget for chest CT.

1. Chest CT: which image layer, and the low-attenuation threshold (-950 HU).
2. Measure: lung masks (right/left) and the low-attenuation mask as Labels
   layers, and the scores table (volume, %LAA, %LAA-910, Perc15 for both
   lungs, each lung and the upper/middle/lower thirds); Export table...
   writes CSV or JSON.

The measurement runs in a child process (``_runner.ProcessRunner``), so napari
stays responsive on a 512 x 512 x 600 CT; Cancel ends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.infer.emphysema import LAA_THRESHOLD_HU, EmphysemaReport
from napari_fewlabel.infer.lungs import LEFT_LUNG, RIGHT_LUNG
from napari_fewlabel.io import METADATA_KEY, Volume
from napari_fewlabel.jobs import EmphysemaReady, measure_emphysema
from napari_fewlabel.napari._layers import (
    PREDICTION_KEY,
    labels_layer_data,
    layer_meta,
    volume_from_layer,
)
from napari_fewlabel.napari._runner import JobFailed, ProcessRunner, notify_failure
from napari_fewlabel.train.events import Notice

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
LUNG_COLORS = {RIGHT_LUNG: (0.2, 0.6, 1.0), LEFT_LUNG: (1.0, 0.6, 0.2)}
LAA_COLOR = {1: (1.0, 0.1, 0.1)}


class EmphysemaWidget(QWidget):
    """Lung masks and %LAA-950 of a chest CT, as layers and a table."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.runner = ProcessRunner(self)
        self.runner.job_event.connect(self._on_event)
        self.runner.job_failed.connect(self._on_failed)
        self.runner.job_finished.connect(self._on_finished)
        self.report: EmphysemaReport | None = None
        self._job_image: Image | None = None

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_scan_box())
        layout.addWidget(self._build_measure_box())
        layout.addStretch(1)
        for signal in (
            self.viewer.layers.events.inserted,
            self.viewer.layers.events.removed,
            self.viewer.layers.events.reordered,
        ):
            signal.connect(self._refresh_layers)
        self._refresh_layers()
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.destroyed.connect(self._shutdown)

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

    def selected_image(self) -> Image | None:
        layer = self.image_combo.currentData()
        return layer if layer in self.viewer.layers else None

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
        self.runner.start(measure_emphysema, volume, float(self.threshold_spin.value()))
        self.measure_button.setText("Cancel")
        self.status.setText("Segmenting the lungs...")
        return True

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Notice):
            (show_warning if event.level == "warning" else show_info)(event.message)
            self.status.setText(event.message)
        elif isinstance(event, EmphysemaReady):
            self._show_report(event.report)

    def _show_report(self, report: EmphysemaReport) -> None:
        image = self._job_image
        if image is None or image not in self.viewer.layers:
            show_warning("The CT was closed before its lungs arrived; nothing to show.")
            return
        volume = self._volume(image)
        self._put_labels(f"{image.name} lungs", report.lungs.labels, volume, LUNG_COLORS)
        laa = report.low_attenuation.astype(np.uint8)
        self._put_labels(
            f"{image.name} LAA{report.threshold_hu:g}", laa, volume, LAA_COLOR, opacity=0.8
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
        colors: dict[int, tuple[float, float, float]],
        opacity: float = 0.4,
    ) -> None:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        array, kwargs, _ = labels_layer_data(data, like, name, colors=colors)
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
        self.status.setText(notify_failure(failure, "The measurement"))

    def _on_finished(self) -> None:
        self.measure_button.setText("Measure")

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

    # ------------------------------------------------------------ lifetime
    def _shutdown(self, *_: Any) -> None:
        self.runner.shutdown(timeout_s=3.0)

    def closeEvent(self, event: Any) -> None:
        self._shutdown()
        super().closeEvent(event)
