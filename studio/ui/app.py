"""The application: QApplication with our identity and theme, and the window."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QApplication

from studio import app_info
from studio.ui import theme


def create_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication (reused when one exists, as under pytest-qt), named and themed."""
    QApplication.setApplicationName(app_info.APP_EXECUTABLE)
    QApplication.setApplicationDisplayName(app_info.APP_NAME)
    QApplication.setOrganizationName(app_info.ORGANIZATION)
    QApplication.setApplicationVersion(app_info.VERSION)
    QApplication.setDesktopFileName(app_info.APP_ID)  # matches the .desktop file, so docks group the window
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else app_info.APP_EXECUTABLE, *(argv or [])])
    theme.apply_theme(app)
    app.setWindowIcon(theme.icon("app"))
    return app


def main(argv: list[str] | None = None) -> int:
    from studio.engine.offline import force_offline
    from studio.ui.main_window import MainWindow

    force_offline()  # the GUI never downloads; set before anything imports huggingface_hub
    app = create_app(argv)
    window = MainWindow()
    window.show()
    return app.exec()
