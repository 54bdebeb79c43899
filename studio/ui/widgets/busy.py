"""BusyIndicator: a small spinner with a sentence, shown while work runs off the GUI thread."""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QHBoxLayout, QLabel, QWidget

from studio.ui import theme


class Spinner(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._angle = 0
        self._timer = QTimer(self)
        self._timer.setInterval(50)
        self._timer.timeout.connect(self._tick)

    def sizeHint(self) -> QSize:
        h = theme.em(self)
        return QSize(h, h)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _tick(self) -> None:
        self._angle = (self._angle + 30) % 360
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        side = min(self.width(), self.height()) - 3
        r = QRectF((self.width() - side) / 2, (self.height() - side) / 2, side, side)
        track = QColor(self.palette().color(self.palette().ColorRole.Mid))
        painter.setPen(QPen(track, 2.5))
        painter.drawEllipse(r)
        pen = QPen(QColor(theme.ACCENT), 2.5)
        pen.setCapStyle(Qt.RoundCap)
        painter.setPen(pen)
        painter.drawArc(r, -self._angle * 16, 100 * 16)
        painter.end()


class BusyIndicator(QWidget):
    """Hidden when idle; ``start("Reading the model…")`` shows the spinner with that text."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(theme.SPACING)
        self.spinner = Spinner()
        self.label = QLabel()
        self.label.setObjectName("muted")
        row.addWidget(self.spinner)
        row.addWidget(self.label, 1)
        self.hide()

    @property
    def active(self) -> bool:
        return not self.isHidden()

    def start(self, text: str) -> None:
        self.label.setText(text)
        self.spinner.start()
        self.show()

    def set_text(self, text: str) -> None:
        self.label.setText(text)

    def stop(self) -> None:
        self.spinner.stop()
        self.hide()
