"""Banner: a sentence for people (error, warning, info, success) with an optional "Show details" part."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QGridLayout, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QWidget

from studio.ui import theme

_ICONS = {"error": "error", "warning": "warning", "info": "info", "success": "state-done"}


class Banner(QFrame):
    """Hidden until :meth:`show_message`; the details (a traceback) stay folded away until asked for."""

    closed = Signal()

    def __init__(self, parent: QWidget | None = None, closable: bool = True, rich_text: bool = False):
        """``rich_text``: messages are HTML (their parts escaped by the caller), never guessed at by Qt, so an
        escaped quote in a sentence without tags shows as ' and not as &#x27;."""
        super().__init__(parent)
        self.setObjectName("banner")
        self.kind = "info"
        self.wanted = False  # has a message to show (in a MessageArea it may still wait behind a more important one)
        self.area = None  # the MessageArea that decides which of its banners shows, if any
        self._arranging = False
        grid = QGridLayout(self)
        s = theme.SPACING
        grid.setContentsMargins(s + s // 2, s, s, s)
        grid.setHorizontalSpacing(s)
        grid.setVerticalSpacing(s // 2)
        self.icon = QLabel()
        self.icon.setAlignment(Qt.AlignTop)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setTextFormat(Qt.RichText if rich_text else Qt.AutoText)
        self.text.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.LinksAccessibleByMouse)
        self.text.setOpenExternalLinks(False)
        self.actions = QHBoxLayout()
        self.actions.setSpacing(s)
        self.details_button = QPushButton("Show details")
        self.details_button.setCheckable(True)
        self.details_button.toggled.connect(self._toggle_details)
        self.actions.addWidget(self.details_button)
        self.close_button = QPushButton("Dismiss")
        self.close_button.clicked.connect(self.dismiss)
        self.close_button.setVisible(closable)
        self.actions.addStretch(1)
        self.actions.addWidget(self.close_button)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setLineWrapMode(QPlainTextEdit.NoWrap)
        self.details.setObjectName("details")
        self.details.setMaximumHeight(theme.em(self) * 10)  # a traceback scrolls; the page stays usable
        self.details.hide()
        grid.addWidget(self.icon, 0, 0, 2, 1)
        grid.addWidget(self.text, 0, 1)
        grid.addLayout(self.actions, 1, 1)
        grid.addWidget(self.details, 2, 1)
        grid.setColumnStretch(1, 1)
        self.hide()

    def show_message(self, kind: str, message: str, details: str = "") -> None:
        self.kind = kind
        self.setProperty("kind", kind)
        self.style().unpolish(self)
        self.style().polish(self)
        size = theme.em(self)
        self.icon.setPixmap(theme.icon(_ICONS.get(kind, "info")).pixmap(size, size))
        self.text.setText(message)
        self.details.setPlainText(details)
        self.details_button.setChecked(False)
        self.details_button.setVisible(bool(details))
        self.show()

    def setVisible(self, visible: bool) -> None:
        """show()/hide() from the banner's owner say whether it has a message; its MessageArea arranges the rest."""
        if self._arranging or self.area is None:
            if not self._arranging:
                self.wanted = visible
            super().setVisible(visible)
            return
        self.wanted = visible
        self.area.banner_changed(self)

    def show_in_area(self, shown: bool) -> None:
        self._arranging = True
        try:
            super().setVisible(shown)
        finally:
            self._arranging = False

    def add_action(self, button: QPushButton) -> QPushButton:
        self.actions.insertWidget(self.actions.count() - 2, button)
        return button

    def dismiss(self) -> None:
        self.hide()
        self.closed.emit()

    def _toggle_details(self, shown: bool) -> None:
        self.details.setVisible(shown)
        self.details_button.setText("Hide details" if shown else "Show details")
