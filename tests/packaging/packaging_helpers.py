"""Shared by the packaging tests: the checkout root, and loading the scripts under packaging/ by path (importing
them as a package named `packaging` would shadow the PyPA `packaging` library)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"


def load_script(relative: str):
    path = PACKAGING / relative
    name = "lora_studio_packaging_" + path.stem.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and friends look modules up by name
    spec.loader.exec_module(module)
    return module
