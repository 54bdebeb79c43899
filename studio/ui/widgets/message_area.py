"""MessageArea: the banners of a page in one place, one shown at a time; "‹ 1 of 2 ›" reaches the others."""

from __future__ import annotations

import itertools

from PySide6.QtWidgets import QHBoxLayout, QLabel, QToolButton, QVBoxLayout, QWidget

from studio.ui import theme
from studio.ui.widgets.banner import Banner

RANK = {"error": 3, "warning": 2, "success": 1, "info": 0}


class MessageArea(QWidget):
    """Owners keep calling ``show_message``/``hide`` on their own banners; the area shows the most important one
    (errors first, then the latest among equals), so two messages never stack up and squeeze the page."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.banners: list[Banner] = []
        self._when: dict[int, int] = {}  # id(banner) -> when it last asked to be shown
        self._clock = itertools.count()
        self.current: Banner | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(theme.SPACING // 2)
        self._stack = QVBoxLayout()
        self._stack.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._stack)
        nav = QHBoxLayout()
        nav.setSpacing(theme.SPACING // 2)
        nav.addStretch(1)
        self.previous_button = QToolButton(text="‹")
        self.previous_button.setToolTip("The previous message")
        self.count_label = QLabel()
        self.count_label.setObjectName("muted")
        self.next_button = QToolButton(text="›")
        self.next_button.setToolTip("The next message")
        self.previous_button.clicked.connect(lambda: self.step(-1))
        self.next_button.clicked.connect(lambda: self.step(1))
        for w in (self.previous_button, self.count_label, self.next_button):
            nav.addWidget(w)
        self.nav = QWidget()
        self.nav.setLayout(nav)
        nav.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.nav)
        self.hide()

    def add(self, banner: Banner) -> Banner:
        self.banners.append(banner)
        self._stack.addWidget(banner)
        banner.area = self
        self.arrange()
        return banner

    def wanted(self) -> list[Banner]:
        """The banners with a message, most important first."""
        live = [b for b in self.banners if b.wanted]
        return sorted(live, key=lambda b: (RANK.get(b.kind, 0), self._when.get(id(b), -1)), reverse=True)

    def banner_changed(self, banner: Banner) -> None:
        if banner.wanted:
            self._when[id(banner)] = next(self._clock)
        self.current = None  # a new or withdrawn message: show the most important again
        self.arrange()

    def step(self, by: int) -> None:
        live = self.wanted()
        if self.current in live:
            self.current = live[(live.index(self.current) + by) % len(live)]
            self.arrange()

    def arrange(self) -> None:
        live = self.wanted()
        if self.current not in live:
            self.current = live[0] if live else None
        for banner in self.banners:
            banner.show_in_area(banner is self.current)
        self.nav.setVisible(len(live) > 1)
        if self.current is not None:
            self.count_label.setText(f"{live.index(self.current) + 1} of {len(live)} messages")
        self.setVisible(bool(live))
