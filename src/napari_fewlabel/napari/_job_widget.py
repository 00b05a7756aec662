"""What every FewLabel dock widget that runs engine jobs shares.

A :class:`JobWidget` owns a child-process runner (``_runner.ProcessRunner``)
and a scratch folder, offers the device picker with the device in use, shows
a job's :class:`~napari_fewlabel.train.events.Progress` events (bar, status
line, live plot, device and memory) and shuts the runner down when napari
closes. Subclasses build their sections and handle their own result events
in ``_on_event``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QComboBox,
    QGroupBox,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_fewlabel.errors import FewLabelError
from napari_fewlabel.napari._plot import LinePlot
from napari_fewlabel.napari._runner import JobFailed, ProcessRunner
from napari_fewlabel.train.device import available_devices
from napari_fewlabel.train.events import Progress

if TYPE_CHECKING:
    import napari

    from napari_fewlabel.jobs import PredictionProgress


def format_eta(seconds: float | None) -> str:
    """``"2 min 05 s left"``, ``"40 s left"``, or ``""`` when unknown."""
    if seconds is None:
        return ""
    seconds = round(seconds)
    return (
        f"{seconds // 60} min {seconds % 60:02d} s left" if seconds >= 60 else f"{seconds} s left"
    )


class JobWidget(QWidget):
    """Base of the dock widgets: runner, scratch folder, device picker, progress, shutdown."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, scratch_prefix: str) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.runner = ProcessRunner(self)
        self.runner.job_event.connect(self._on_event)
        self.runner.job_failed.connect(self._on_failed)
        self.runner.job_finished.connect(self._on_finished)
        self._workdir = Path(tempfile.mkdtemp(prefix=scratch_prefix))
        self.device_label = QLabel("")
        self.device_label.setWordWrap(True)
        self._watch_viewer_close()

    # ------------------------------------------------------------ subclass hooks
    def _on_event(self, event: Any) -> None:
        raise NotImplementedError

    def _on_failed(self, failure: JobFailed) -> None:
        raise NotImplementedError

    def _on_finished(self) -> None:
        raise NotImplementedError

    def _follow_layers(self) -> None:
        """Call ``_refresh_layers`` whenever layers are added, removed or reordered, and now."""
        for signal in (
            self.viewer.layers.events.inserted,
            self.viewer.layers.events.removed,
            self.viewer.layers.events.reordered,
        ):
            signal.connect(self._refresh_layers)
        self._refresh_layers()

    def _refresh_layers(self, event: Any = None) -> None:
        raise NotImplementedError

    def _stop_then_cancel(self, button: QPushButton, status: QLabel, then: str, unit: str) -> None:
        """Stop (first press) or cancel what comes after training (second press).

        Stop ends training after the current ``unit`` (step, update) and the job
        goes on to ``then`` (prediction, mapping) with the model so far; the
        button becomes "Cancel ``then``", which ends the job.
        """
        if not self.runner.is_running:
            return
        if button.text() == f"Cancel {then}":
            self.runner.shutdown(timeout_s=0.5)
            status.setText(f"{then.capitalize()} cancelled.")
            return
        self.runner.stop()
        button.setText(f"Cancel {then}")
        status.setText(f"Stopping after the current {unit}...")

    def _run_box(self, title: str, hint: str, plot: LinePlot) -> QGroupBox:
        """Start/Stop button, progress bar, status line and live plot, in a titled box."""
        box = QGroupBox(title)
        layout = QVBoxLayout(box)
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self._on_start_stop)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        self.status = QLabel(hint)
        self.status.setWordWrap(True)
        self.plot = plot
        for widget in (self.start_button, self.progress, self.status, self.plot):
            layout.addWidget(widget)
        return box

    def _on_start_stop(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ device
    def _device_combo(self) -> QComboBox:
        """The device picker (auto, cpu, each GPU, mps); ``device_label`` says what is used."""
        combo = QComboBox()
        combo.addItems(available_devices())
        combo.currentTextChanged.connect(self._show_device)
        self._show_device(combo.currentText())
        return combo

    def _show_device(self, choice: str) -> None:
        from napari_fewlabel.train.device import describe_device, resolve_device

        try:
            device = resolve_device(choice)
        except FewLabelError as exc:
            self.device_label.setText(str(exc))
            return
        text = describe_device(device)
        if device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device)
            text += f"; {free / 2**30:.1f} of {total / 2**30:.0f} GB free"
        self.device_label.setText(text)

    # ------------------------------------------------------------ progress
    def _show_progress(
        self,
        event: Progress,
        bar: QProgressBar,
        status: QLabel,
        plot: LinePlot,
        *,
        losses_in_status: bool = False,
    ) -> None:
        """Bar, status line (step, ETA, validation Dice), plot, and the device in use."""
        bar.setRange(0, event.total)
        bar.setValue(event.step)
        warm = " (critic warm-up)" if event.extra.get("warmup") else ""
        parts = [f"step {event.step}/{event.total}{warm}"]
        for name, value in event.losses.items():
            plot.add_point(name, event.step, value)
            if losses_in_status:
                parts.append(f"{name} {value:.3f}")
        if event.val_dice is not None:
            plot.add_point("val Dice", event.step, event.val_dice)
            parts.append(f"validation Dice {event.val_dice:.3f}")
        agreement = event.extra.get("stream_agreement")
        if agreement is not None:  # costs no label: the two decoders' labels compared
            plot.add_point("stream agreement", event.step, agreement)
            parts.append(f"stream agreement {agreement:.2f}")
        parts.append(event.note)
        parts.append(format_eta(event.eta_s))
        status.setText(" · ".join(p for p in parts if p))
        memory = f", {event.memory_mb:.0f} MB" if event.memory_mb else ""
        self.device_label.setText(f"{event.device}{memory}")

    def _show_prediction_progress(self, event: PredictionProgress, bar: QProgressBar) -> None:
        """The bar follows a prediction's slices, as a percentage (several planes add up)."""
        bar.setFormat("predicting: %p%")
        bar.setRange(0, max(1, event.total))
        bar.setValue(event.done)

    # ------------------------------------------------------------ lifetime
    def _watch_viewer_close(self) -> None:
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.destroyed.connect(self._shutdown)
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._shutdown)

    def _shutdown(self, *_: Any) -> None:
        self.runner.shutdown(timeout_s=3.0)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def closeEvent(self, event: Any) -> None:
        self._shutdown()
        super().closeEvent(event)
