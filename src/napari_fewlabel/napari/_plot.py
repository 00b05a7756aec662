"""A small live line plot (losses, validation Dice) drawn with QPainter.

napari does not ship a plotting library; this draws a few polylines with a
legend, which is all the training monitor needs, and costs microseconds per
update so it never holds up the event loop.
"""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

_COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")


class LinePlot(QWidget):
    """Series of (step, value); each series scaled to its own range unless ``unit_range``.

    Series named in ``unit_range`` (e.g. Dice) are drawn on a fixed 0-1 scale.
    """

    def __init__(self, parent: QWidget | None = None, unit_range: tuple[str, ...] = ()) -> None:
        super().__init__(parent)
        self._series: dict[str, list[tuple[float, float]]] = {}
        self._unit_range = set(unit_range)
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self) -> None:
        self._series.clear()
        self.update()

    def add_point(self, name: str, step: float, value: float) -> None:
        self._series.setdefault(name, []).append((float(step), float(value)))
        self.update()

    def series(self) -> dict[str, list[tuple[float, float]]]:
        return {k: list(v) for k, v in self._series.items()}

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        area = QRectF(self.rect()).adjusted(4, 4, -4, -18)
        painter.setPen(QPen(QColor("#666666")))
        painter.drawRect(area)
        if not self._series:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "losses and validation Dice")
            return
        max_step = max((p[0] for pts in self._series.values() for p in pts), default=1.0) or 1.0
        legend_x = area.left()
        for i, (name, pts) in enumerate(self._series.items()):
            color = QColor(_COLORS[i % len(_COLORS)])
            values = [v for _, v in pts]
            lo, hi = (0.0, 1.0) if name in self._unit_range else (min(values), max(values))
            span = (hi - lo) or 1.0
            poly = QPolygonF(
                [
                    QPointF(
                        area.left() + area.width() * s / max_step,
                        area.bottom() - area.height() * (v - lo) / span,
                    )
                    for s, v in pts
                ]
            )
            painter.setPen(QPen(color, 1.5))
            painter.drawPolyline(poly)
            label = f"{name} {values[-1]:.3g}"
            painter.drawText(QPointF(legend_x, self.height() - 4), label)
            legend_x += painter.fontMetrics().horizontalAdvance(label) + 12
