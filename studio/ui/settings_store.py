"""The window's remembered state (QSettings, INI format everywhere so tests can point it at a temp folder)."""

from __future__ import annotations

from PySide6.QtCore import QSettings

from studio.app_info import APP_EXECUTABLE, ORGANIZATION


def app_settings() -> QSettings:
    return QSettings(QSettings.IniFormat, QSettings.UserScope, ORGANIZATION, APP_EXECUTABLE)


def read_list(key: str) -> list[str]:
    value = app_settings().value(key, [])
    if isinstance(value, str):  # QSettings hands back a one-item list as a plain string
        return [value] if value else []
    return [str(v) for v in (value or [])]


def push_recent(key: str, item: str, limit: int = 8) -> list[str]:
    items = [item] + [i for i in read_list(key) if i != item]
    items = items[:limit]
    app_settings().setValue(key, items)
    return items
