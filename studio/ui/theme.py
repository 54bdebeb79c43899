"""Look and feel: Fusion with a light or dark palette following the system, one accent colour, SVG icons."""

from __future__ import annotations

import functools
import os

from PySide6.QtCore import QByteArray, QPoint, QRect, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QIconEngine, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import QApplication, QWidget

from studio.paths import resource_path

ACCENT = "#4c6ef5"
# Marks keep their meaning in both themes, so their colours are fixed rather than taken from the palette.
OK_COLOUR = "#2f9e44"
WARN_COLOUR = "#e8590c"
ERROR_COLOUR = "#e03131"
SPACING = 8  # the 8 px grid; Qt scales logical pixels on HiDPI screens

# "card" is the background of framed groups: lighter than the window in both themes, and in the dark theme
# lighter than input fields ("base") too, so fields and check boxes stand out on it.
_LIGHT = {
    "window": "#f4f5f7", "base": "#ffffff", "card": "#ffffff", "alt": "#f0f1f4", "text": "#1d2025",
    "button": "#eceef2", "mid": "#c5c9d1", "dark": "#9aa0aa", "muted": "#6b7280", "tooltip": "#ffffff",
}
_DARK = {
    "window": "#1e2024", "base": "#16171a", "card": "#272a30", "alt": "#24272c", "text": "#e4e6ea",
    "button": "#32363d", "mid": "#454a53", "dark": "#0f1012", "muted": "#9aa1ad", "tooltip": "#2b2e34",
}


def is_dark() -> bool:
    """Follows the system setting; ``LORA_STUDIO_THEME=dark|light`` overrides it (screenshots use it)."""
    forced = os.environ.get("LORA_STUDIO_THEME", "").lower()
    if forced in ("dark", "light"):
        return forced == "dark"
    app = QGuiApplication.instance()
    if app is None:
        return False
    return QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark


def colours() -> dict[str, str]:
    return _DARK if is_dark() else _LIGHT


def make_palette(dark: bool) -> QPalette:
    c = _DARK if dark else _LIGHT
    p = QPalette()
    roles = {
        QPalette.Window: c["window"], QPalette.WindowText: c["text"], QPalette.Base: c["base"],
        QPalette.AlternateBase: c["alt"], QPalette.Text: c["text"], QPalette.Button: c["button"],
        QPalette.ButtonText: c["text"], QPalette.ToolTipBase: c["tooltip"], QPalette.ToolTipText: c["text"],
        QPalette.Highlight: ACCENT, QPalette.HighlightedText: "#ffffff", QPalette.Link: ACCENT,
        QPalette.LinkVisited: ACCENT, QPalette.PlaceholderText: c["muted"], QPalette.Mid: c["mid"],
        QPalette.Dark: c["dark"], QPalette.Light: c["base"], QPalette.Midlight: c["alt"], QPalette.Shadow: "#000000",
        QPalette.BrightText: ERROR_COLOUR, QPalette.Accent: ACCENT,
    }
    for role, colour in roles.items():
        p.setColor(role, QColor(colour))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        p.setColor(QPalette.Disabled, role, QColor(c["muted"]))
    p.setColor(QPalette.Disabled, QPalette.Highlight, QColor(c["mid"]))
    return p


def apply_theme(app: QApplication) -> None:
    """Fusion + our palette + the small style sheet; call again when the system switches light/dark."""
    app.setStyle("Fusion")
    dark = is_dark()
    app.setPalette(make_palette(dark))
    qss = resource_path("style.qss")
    sheet = qss.read_text(encoding="utf-8") if qss.is_file() else ""
    c = colours()
    for key, value in {**c, "accent": ACCENT, "ok": OK_COLOUR, "warn": WARN_COLOUR, "error": ERROR_COLOUR}.items():
        sheet = sheet.replace(f"@{key}", value)
    app.setStyleSheet(sheet)


class _SvgIconEngine(QIconEngine):
    """Renders an SVG at whatever size and pixel ratio is asked, so icons stay sharp on HiDPI screens.

    ``currentColor`` is filled in with the theme's text colour when painting, so icons follow a switch
    between light and dark without being made again.
    """

    def __init__(self, svg: str):
        super().__init__()
        self._svg = svg
        self._renderers: dict[str, QSvgRenderer] = {}

    def _renderer(self) -> QSvgRenderer:
        colour = colours()["text"]
        if colour not in self._renderers:
            self._renderers[colour] = QSvgRenderer(QByteArray(self._svg.replace("currentColor", colour).encode()))
        return self._renderers[colour]

    def paint(self, painter: QPainter, rect: QRect, mode: QIcon.Mode, state: QIcon.State) -> None:
        if mode == QIcon.Mode.Disabled:
            painter.setOpacity(0.35)
        self._renderer().render(painter, QRectF(rect))

    def pixmap(self, size: QSize, mode: QIcon.Mode, state: QIcon.State) -> QPixmap:
        return self.scaledPixmap(size, mode, state, 1.0)

    def scaledPixmap(self, size: QSize, mode: QIcon.Mode, state: QIcon.State, scale: float) -> QPixmap:
        pm = QPixmap(size * scale)
        pm.fill(Qt.GlobalColor.transparent)
        painter = QPainter(pm)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.paint(painter, QRect(QPoint(0, 0), size * scale), mode, state)
        painter.end()
        pm.setDevicePixelRatio(scale)
        return pm

    def clone(self) -> QIconEngine:
        return _SvgIconEngine(self._svg)


@functools.lru_cache(maxsize=None)
def icon(name: str) -> QIcon:
    """``resources/icons/<name>.svg``; ``currentColor`` in the file becomes the theme's text colour."""
    path = resource_path("icons", f"{name}.svg")
    if not path.is_file():
        return QIcon()
    return QIcon(_SvgIconEngine(path.read_text(encoding="utf-8")))


def em(widget: QWidget | None = None) -> int:
    """Height of a line of text: sizes derived from it follow the user's font and screen scaling."""
    fm = widget.fontMetrics() if widget is not None else QApplication.fontMetrics()
    return fm.height()


def muted(text: str) -> str:
    """Rich text in the secondary text colour."""
    return f'<span style="color:{colours()["muted"]}">{text}</span>'
