"""Where resources and per-user data live, in a source checkout, an installed wheel or a frozen bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from studio.app_info import APP_EXECUTABLE


def _resources_root() -> Path:
    frozen_root = getattr(sys, "_MEIPASS", None)
    if frozen_root:  # PyInstaller bundle: the spec copies resources/ next to the code
        return Path(frozen_root) / "resources"
    checkout = Path(__file__).resolve().parent.parent / "resources"
    if checkout.is_dir():  # source checkout or editable install
        return checkout
    # Installed wheel: pyproject maps resources/ to the package studio._resources.
    return Path(__file__).resolve().parent / "_resources"


def resource_path(*parts: str) -> Path:
    """Path of a bundled resource, e.g. ``resource_path("tokenizers", "clip")``."""
    return _resources_root().joinpath(*parts)


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def user_cache_dir() -> Path:
    """Per-user cache (demo model, latent caches). ``LORA_STUDIO_CACHE`` overrides it (tests do)."""
    override = os.environ.get("LORA_STUDIO_CACHE")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / APP_EXECUTABLE / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / APP_EXECUTABLE
    return _xdg("XDG_CACHE_HOME", ".cache") / APP_EXECUTABLE


def user_data_dir() -> Path:
    """Per-user data (user presets, default run folder). ``LORA_STUDIO_DATA`` overrides it."""
    override = os.environ.get("LORA_STUDIO_DATA")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / APP_EXECUTABLE
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_EXECUTABLE
    return _xdg("XDG_DATA_HOME", ".local/share") / APP_EXECUTABLE


def queue_file() -> Path:
    """The job queue the window keeps between sessions (engine.job_queue reads and writes it)."""
    return user_data_dir() / "queue.json"
