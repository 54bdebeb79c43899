"""Make every Hugging Face library offline before it is imported: LoRA Studio never downloads."""

from __future__ import annotations

import os

_OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def force_offline() -> None:
    """Set the offline switches; huggingface_hub reads them at import time, so this runs first."""
    for key, value in _OFFLINE_VARS.items():
        os.environ[key] = value
