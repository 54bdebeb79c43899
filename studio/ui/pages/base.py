"""Page: what every step of the rail shares — a title, a one-line purpose, a state mark and help text."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from studio.ui import theme

PENDING, ATTENTION, DONE, RUNNING = "pending", "attention", "done", "running"

# The job fields edited on the Model and Dataset pages; every other field is on the Settings page.
FIELD_PAGES = {"model.path": "model", "dataset.path": "dataset", "dataset.trigger_word": "dataset",
               "dataset.repeats": "dataset"}


def page_for_field(path: str) -> str:
    """Which page a job field is edited on (where to send someone to fix it)."""
    return FIELD_PAGES.get(path, "settings")


class Page(QWidget):
    """A step of the rail; ``state_changed`` whenever :meth:`state` may have changed."""

    title = ""
    purpose = ""
    help_html = ""
    icon_name = ""
    state_changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.layout_ = QVBoxLayout(self)
        s = theme.SPACING
        self.layout_.setContentsMargins(3 * s, 3 * s, 3 * s, 2 * s)
        self.layout_.setSpacing(2 * s)
        header = QVBoxLayout()
        header.setSpacing(s // 2)
        title_row = QHBoxLayout()
        title_row.setSpacing(s)
        self.title_icon = QLabel()
        self.title_label = QLabel(self.title)
        self.title_label.setObjectName("pageTitle")
        title_row.addWidget(self.title_icon)
        title_row.addWidget(self.title_label, 1)
        self.purpose_label = QLabel(self.purpose)
        self.purpose_label.setObjectName("muted")
        self.purpose_label.setWordWrap(True)
        header.addLayout(title_row)
        header.addWidget(self.purpose_label)
        self._paint_title_icon()
        self.layout_.addLayout(header)

    def state(self) -> tuple[str, str]:
        """(PENDING | ATTENTION | DONE | RUNNING, a sentence for the rail's tooltip)."""
        return PENDING, ""

    def refresh_icons(self) -> None:
        """Called after the theme changed: pixmaps made from icons are redrawn in the new text colour."""
        self._paint_title_icon()

    def _paint_title_icon(self) -> None:
        self.title_label.ensurePolished()
        side = self.title_label.fontMetrics().height()
        self.title_icon.setPixmap(theme.icon(self.icon_name).pixmap(side, side) if self.icon_name else QPixmap())


def card(parent: QWidget | None = None) -> tuple[QFrame, QVBoxLayout]:
    """A framed group with the usual padding."""
    frame = QFrame(parent)
    frame.setObjectName("card")
    layout = QVBoxLayout(frame)
    s = theme.SPACING
    layout.setContentsMargins(2 * s, 2 * s, 2 * s, 2 * s)
    layout.setSpacing(s)
    return frame, layout


def section_label(text: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("sectionHeader")
    return label
