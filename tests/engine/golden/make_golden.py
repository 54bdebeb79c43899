"""Regenerate the golden kohya key lists: python tests/engine/golden/make_golden.py (review the diff by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]

from architectures import ARCHITECTURES, golden_path, meta_bundle  # noqa: E402

from studio.engine.config import LoraSection  # noqa: E402
from studio.engine.export import kohya_keys, kohya_module_names  # noqa: E402
from studio.engine.lora import PRESETS, inject_lora  # noqa: E402


def golden_names(name: str, preset: str) -> list[str]:
    """Sorted kohya module names of every LoRA module of an architecture and preset (text encoders included)."""
    bundle = meta_bundle(name)
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0, targets=preset), train_text_encoder=True)
    return sorted(n for names in kohya_module_names(bundle).values() for n in names)


# LyCORIS's usual settings (kohya_ss/LyCORIS presets "full": attention, projections, feed-forward and convolutions).
LYCORIS_GOLDEN = {
    "loha": LoraSection(algorithm="loha", rank=16, alpha=8.0, targets="+conv"),
    "lokr": LoraSection(algorithm="lokr", rank=16, alpha=8.0, targets="+conv", lokr_factor=8),
}
LYCORIS_ARCHITECTURES = ("sd1", "sdxl")


def lycoris_golden_path(name: str, algorithm: str) -> Path:
    return HERE / f"lycoris_{name}_{algorithm}.txt"


def lycoris_golden_keys(name: str, algorithm: str) -> list[str]:
    """Sorted LyCORIS-layout keys (module.suffix) of an architecture's LoHa/LoKr, text encoders included."""
    bundle = meta_bundle(name)
    inject_lora(bundle, LYCORIS_GOLDEN[algorithm], train_text_encoder=True)
    return sorted(kohya_keys(bundle))


def main() -> None:
    for name in ARCHITECTURES:
        for preset in PRESETS:
            names = golden_names(name, preset)
            golden_path(name, preset).write_text("\n".join(names) + "\n", encoding="utf-8")
            print(f"{name:6} {preset:14} {len(names)} modules")
    for name in LYCORIS_ARCHITECTURES:
        for algorithm in LYCORIS_GOLDEN:
            keys = lycoris_golden_keys(name, algorithm)
            lycoris_golden_path(name, algorithm).write_text("\n".join(keys) + "\n", encoding="utf-8")
            print(f"{name:6} {algorithm:14} {len(keys)} keys")


if __name__ == "__main__":
    main()
