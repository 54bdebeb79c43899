"""Tiny random models of each registered family (the demo model and the test fixtures): real architecture, seconds to build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.engine.families import get_family

TINY_RESOLUTION = 64  # the native size of every family's tiny model


def build_tiny_pipeline(family_name: str, prediction_type: str = "epsilon", seed: int = 0) -> Any:
    """A random diffusers pipeline of the family's architecture, small enough to train on a CPU in seconds."""
    return get_family(family_name).build_tiny(prediction_type, seed)


def save_tiny_model(folder: Path, family_name: str, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build and save a tiny model as a diffusers folder (tokenizers as vocab + merges files); returns the folder."""
    return get_family(family_name).save_tiny(Path(folder), prediction_type, seed)
