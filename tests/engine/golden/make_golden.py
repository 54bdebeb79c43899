"""Regenerate the golden kohya key lists: python tests/engine/golden/make_golden.py (review the diff by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]

from architectures import ARCHITECTURES, golden_path, meta_bundle  # noqa: E402

from studio.engine.config import LoraSection  # noqa: E402
from studio.engine.export import kohya_module_names  # noqa: E402
from studio.engine.lora import PRESETS, inject_lora  # noqa: E402


def golden_names(name: str, preset: str) -> list[str]:
    """Sorted kohya module names of every LoRA module of an architecture and preset (text encoders included)."""
    bundle = meta_bundle(name)
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0, targets=preset), train_text_encoder=True)
    return sorted(n for names in kohya_module_names(bundle).values() for n in names)


def main() -> None:
    for name in ARCHITECTURES:
        for preset in PRESETS:
            names = golden_names(name, preset)
            golden_path(name, preset).write_text("\n".join(names) + "\n", encoding="utf-8")
            print(f"{name:6} {preset:14} {len(names)} modules")


if __name__ == "__main__":
    main()
