"""The application: QApplication with our identity and theme, and the window."""

from __future__ import annotations

import os
import sys
import time

from PySide6.QtCore import QTimer
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
    if os.environ.get(EXIT_AFTER_SHOW):
        _quit_once_exposed(app, window)
    return app.exec()


# Set to check an installation or a frozen bundle without a person: the window is created, shown and exposed by
# the platform plugin, a line says so, and the app closes normally with exit code 0 (1 if it never got exposed).
# QT_QPA_PLATFORM=offscreen makes it work without a display.
EXIT_AFTER_SHOW = "LORA_STUDIO_EXIT_AFTER_SHOW"


def _quit_once_exposed(app: QApplication, window, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s

    def poll() -> None:
        handle = window.windowHandle()
        shown = window.isVisible() and handle is not None and handle.isExposed()
        if not shown and time.monotonic() < deadline:
            QTimer.singleShot(50, poll)
            return
        if shown:
            print(f"{app_info.APP_NAME}: the window opened ({window.width()}x{window.height()}, "
                  f"{QApplication.platformName()}); closing because {EXIT_AFTER_SHOW} is set", flush=True)
        else:
            print(f"{app_info.APP_NAME}: the window was not shown within {timeout_s:.0f} s", file=sys.stderr, flush=True)
        window.close()  # the normal way out: background tasks are waited for, the window state is saved
        app.exit(0 if shown else 1)

    QTimer.singleShot(0, poll)
