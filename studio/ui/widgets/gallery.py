"""SampleGallery: preview images grouped by step, newest first; click one to see it large."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QDialog, QDialogButtonBox, QFrame, QHBoxLayout, QLabel, QScrollArea, QSizePolicy, QToolButton, QVBoxLayout,
    QWidget,
)

from studio.ui import theme


class ImageDialog(QDialog):
    """One image, as large as the screen allows, with what made it."""

    def __init__(self, pixmap: QPixmap, caption: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Preview")
        layout = QVBoxLayout(self)
        layout.setSpacing(theme.SPACING)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignCenter)
        screen = self.screen().availableGeometry().size() * 0.7 if self.screen() else QSize(800, 800)
        side = min(screen.width(), screen.height())
        # Small previews (the demo model makes 64 px) are scaled up so they can be judged; never blurred down.
        target = max(pixmap.width(), min(side, pixmap.width() * 4))
        self.image.setPixmap(pixmap.scaled(target, target, Qt.KeepAspectRatio,
                                           Qt.FastTransformation if pixmap.width() < 128 else Qt.SmoothTransformation))
        text = QLabel(caption)
        text.setWordWrap(True)
        text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(self.image, 1)
        layout.addWidget(text)
        layout.addWidget(buttons)


class SampleGallery(QScrollArea):
    """Rows of thumbnails, one row per step; ``sample_clicked(pixmap, caption)`` when one is clicked."""

    sample_clicked = Signal(object, str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self._inner = QWidget()
        self._layout = QVBoxLayout(self._inner)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(theme.SPACING)
        self._empty = QLabel("Preview images appear here as training reaches each “sample every” step.")
        self._empty.setObjectName("emptyState")
        self._empty.setWordWrap(True)
        self._empty.setAlignment(Qt.AlignCenter)
        self._layout.addWidget(self._empty, 100)  # fills the area while shown; the stretch below takes over after
        self._layout.addStretch(1)
        self.setWidget(self._inner)
        self._rows: dict[int, QHBoxLayout] = {}
        self.buttons: list[QToolButton] = []

    @property
    def count(self) -> int:
        return len(self.buttons)

    def thumb_size(self) -> int:
        return theme.em(self) * 7

    def clear(self) -> None:
        for step in list(self._rows):
            item = self._layout.itemAt(self._index_of(step))
            box = item.widget()
            self._layout.removeWidget(box)
            box.deleteLater()
        self._rows.clear()
        self.buttons.clear()
        self._empty.show()

    def _index_of(self, step: int) -> int:
        for i in range(self._layout.count()):
            w = self._layout.itemAt(i).widget()
            if w is not None and w.property("step") == step:
                return i
        raise KeyError(step)

    def _row(self, step: int) -> QHBoxLayout:
        if step in self._rows:
            return self._rows[step]
        box = QWidget()
        box.setProperty("step", step)
        col = QVBoxLayout(box)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(theme.SPACING // 2)
        header = QLabel(f"Step {step}")
        header.setObjectName("sectionHeader")
        row = QHBoxLayout()
        row.setSpacing(theme.SPACING)
        row.addStretch(1)
        col.addWidget(header)
        col.addLayout(row)
        # Newest step first: the latest previews are what people watch for.
        later = [s for s in self._rows if s > step]
        position = 1 + len(later)  # after the empty-state label
        self._layout.insertWidget(position, box)
        self._rows[step] = row
        self._empty.hide()
        return row

    def add_sample(self, step: int, index: int, prompt: str, pixmap: QPixmap, path: Path | None = None,
                   seed: int | None = None) -> QToolButton:
        row = self._row(step)
        side = self.thumb_size()
        button = QToolButton()
        button.setIcon(pixmap.scaled(side, side, Qt.KeepAspectRatio,
                                     Qt.FastTransformation if pixmap.width() < side // 2 else Qt.SmoothTransformation))
        button.setIconSize(QSize(side, side))
        # The prompt under the picture: which preview is which, without hovering. Elided at the start, since
        # prompts often share their beginning (the trigger word) and differ at the end.
        button.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
        button.setText(button.fontMetrics().elidedText(prompt, Qt.ElideLeft, side))
        button.setAutoRaise(True)
        button.setSizePolicy(QSizePolicy.Fixed, QSizePolicy.Fixed)
        caption = f"Step {step} · “{prompt}”" + (f" · seed {seed}" if seed is not None else "")
        if path:
            caption += f"\n{path}"
        button.setToolTip(caption)
        button.setProperty("index", index)
        button.clicked.connect(lambda: self.sample_clicked.emit(pixmap, caption))
        # Keep prompts in order within a step.
        position = sum(1 for i in range(row.count() - 1) if (row.itemAt(i).widget().property("index") or 0) < index)
        row.insertWidget(position, button)
        self.buttons.append(button)
        return button
