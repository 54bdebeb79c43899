"""Regenerate SD3's golden kohya key lists: python tests/engine/golden/make_golden_sd3.py (review the diff by hand).

The full-size SD3 Medium, SD3.5 Medium and SD3.5 Large transformers and their CLIP encoders, built on the meta
device from the bundled configs; one line per kohya LoRA name (q, k and v share their fused ``qkv`` name).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT)]

VARIANTS = {"sd3": "sd3-medium", "sd3.5-medium": "sd3.5-medium", "sd3.5-large": "sd3.5-large"}
PRESETS = ("attention", "kohya-default")


def meta_bundle(family_name: str):
    """A ModelBundle of the full-size architecture on the meta device (VAE, T5, tokenizers, scheduler left out)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from studio.engine.families import ModelBundle, get_family

    folder = ROOT / "resources" / "model_configs" / VARIANTS[family_name]
    config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / sub))
                    for sub in ("text_encoder", "text_encoder_2")]
    return ModelBundle(get_family(family_name), "flow", transformer, None, encoders, [], None, f"meta:{family_name}")


def golden_path(family_name: str, preset: str) -> Path:
    return HERE / f"{family_name}_{preset}.txt"


def golden_names(family_name: str, preset: str) -> list[str]:
    from studio.engine.config import LoraSection
    from studio.engine.export import kohya_module_names
    from studio.engine.lora import inject_lora

    bundle = meta_bundle(family_name)
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0, targets=preset), train_text_encoder=True)
    return sorted({n for names in kohya_module_names(bundle).values() for n in names})


def main() -> None:
    for family_name in VARIANTS:
        for preset in PRESETS:
            names = golden_names(family_name, preset)
            golden_path(family_name, preset).write_text("\n".join(names) + "\n", encoding="utf-8")
            unet = sum(n.startswith("lora_unet_") for n in names)
            print(f"{family_name:13} {preset:14} {len(names)} names ({unet} transformer, {len(names) - unet} CLIP)")


if __name__ == "__main__":
    main()
