"""Make every Hugging Face library offline before it is imported: LoRA Studio never downloads."""

from __future__ import annotations

import os

_OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# The libraries' own per-file progress bars and info chatter would drown the app's progress display.
_QUIET_VARS = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def force_offline() -> None:
    """Set the offline switches; huggingface_hub reads them at import time, so this runs first."""
    for key, value in _OFFLINE_VARS.items():
        os.environ[key] = value
    for key, value in _QUIET_VARS.items():
        os.environ.setdefault(key, value)
