"""DropZone: the empty state of a page — says what to drop and what happens — and the drop target itself."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QDragEnterEvent, QDropEvent, QPainter, QPen
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QSizePolicy, QVBoxLayout, QWidget

from studio.ui import theme


def local_paths(event: QDragEnterEvent | QDropEvent) -> list[Path]:
    mime = event.mimeData()
    if not mime.hasUrls():
        return []
    return [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile()]


class DropZone(QFrame):
    """A dashed area that accepts folders and/or files; ``dropped`` gets an accepted path, ``refused`` a sentence.

    ``check(path) -> str | None`` returns why a path is refused (None accepts it).
    """

    dropped = Signal(str)
    refused = Signal(str)

    def __init__(self, title: str, subtitle: str, icon: str = "drop", check=None, compact: bool = False,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("dropZone")
        self.setAcceptDrops(True)
        self._check = check or (lambda path: None)
        self._hover = False
        self._icon = QLabel()
        self._icon_name = icon
        self.title = QLabel(title)
        self.title.setObjectName("dropTitle")
        self.title.setWordWrap(True)
        self.subtitle = QLabel(subtitle)
        self.subtitle.setWordWrap(True)
        self.subtitle.setObjectName("muted")
        self.message = QLabel()
        self.message.setObjectName("dropMessage")
        self.message.setWordWrap(True)
        self.message.hide()
        self.buttons = QHBoxLayout()
        self.buttons.setSpacing(theme.SPACING)
        self._compact = compact
        s = theme.SPACING
        if compact:
            row = QHBoxLayout(self)
            row.setContentsMargins(2 * s, s, 2 * s, s)
            row.setSpacing(2 * s)
            text = QVBoxLayout()
            text.setSpacing(0)
            text.addWidget(self.title)
            text.addWidget(self.subtitle)
            text.addWidget(self.message)
            row.addWidget(self._icon)
            row.addLayout(text, 1)
            row.addLayout(self.buttons)
            self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        else:
            col = QVBoxLayout(self)
            col.setContentsMargins(4 * s, 4 * s, 4 * s, 4 * s)
            col.setSpacing(s)
            col.addStretch(1)
            for w in (self._icon, self.title, self.subtitle, self.message):
                # No layout alignment: a word-wrapped label given one gets too narrow a width and is cut off.
                col.addWidget(w)
                w.setAlignment(Qt.AlignHCenter)
            col.addSpacing(s)
            col.addLayout(self.buttons)
            self.buttons.insertStretch(0)
            self.buttons.addStretch()
            col.addStretch(1)
            self.title.setProperty("large", True)
            self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.refresh_icon()

    def refresh_icon(self) -> None:
        size = theme.em(self) * (2 if self._compact else 4)
        self._icon.setPixmap(theme.icon(self._icon_name).pixmap(size, size))

    def add_button(self, button: QWidget) -> QWidget:
        if self._compact:
            self.buttons.addWidget(button)
        else:
            self.buttons.insertWidget(self.buttons.count() - 1, button)
        return button

    def show_message(self, text: str) -> None:
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def offer(self, path: str | Path) -> bool:
        """What a drop does, callable from buttons and tests: check, then emit dropped or refused."""
        path = Path(path)
        reason = self._check(path)
        if reason:
            self.show_message(reason)
            self.refused.emit(reason)
            return False
        self.show_message("")
        self.dropped.emit(str(path))
        return True

    # ------------------------------------------------------------------------------------------ events

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        paths = local_paths(event)
        if len(paths) == 1 and paths[0].suffix.lower() == ".toml":
            event.ignore()  # a job file: the window opens it
        elif paths:
            event.acceptProposedAction()
            self._hover = True
            self.update()
        else:
            event.ignore()

    def dragLeaveEvent(self, event) -> None:
        self._hover = False
        self.update()

    def dropEvent(self, event: QDropEvent) -> None:
        self._hover = False
        self.update()
        paths = local_paths(event)
        if not paths:
            event.ignore()
            return
        if len(paths) > 1:
            reason = "Please drop one item at a time."
            self.show_message(reason)
            self.refused.emit(reason)
        else:
            self.offer(paths[0])
        event.acceptProposedAction()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        colour = QColor(theme.ACCENT) if self._hover else pal.color(pal.ColorRole.Mid)
        fill = QColor(theme.ACCENT)
        fill.setAlpha(28 if self._hover else 0)
        pen = QPen(colour, 1.5, Qt.DashLine)
        painter.setPen(pen)
        painter.setBrush(fill if self._hover else QColor(theme.colours()["card"]))
        r = QRectF(self.rect()).adjusted(1, 1, -1, -1)
        radius = theme.SPACING
        painter.drawRoundedRect(r, radius, radius)
        painter.end()


def folder_only(path: Path) -> str | None:
    if path.is_dir():
        return None
    if path.is_file():
        return (f"“{path.name}” is a file. Drop the folder that holds your images and their .txt captions "
                "(or use Browse).")
    return f"“{path}” cannot be found."
