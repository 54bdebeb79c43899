"""PIL images to QImage/QPixmap — called on the GUI thread only."""

from __future__ import annotations

from typing import Any

from PySide6.QtGui import QImage, QPixmap


def pil_to_qimage(image: Any) -> QImage:
    """A deep copy, so the QImage does not point into the PIL buffer after that is freed."""
    rgba = image.convert("RGBA")
    data = rgba.tobytes("raw", "RGBA")
    qimage = QImage(data, rgba.width, rgba.height, rgba.width * 4, QImage.Format_RGBA8888)
    return qimage.copy()


def pil_to_pixmap(image: Any) -> QPixmap:
    return QPixmap.fromImage(pil_to_qimage(image))
