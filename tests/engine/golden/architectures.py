"""Full-size SD1.5 / SD2-768-v / SDXL architectures on the meta device (no memory, no weights) for key-name tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Used only when resources/model_configs/<name>/ is missing; the values are those of the public diffusers configs
# (runwayml SD1.5, stabilityai SD2.1 768-v, stabilityai SDXL base 1.0), limited to what shapes the module tree.
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   projection_dim=512, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)
_SD_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
FALLBACK = {
    "sd1": {"unet": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
            "text_encoder": _CLIP_L},
    "sd2-v": {"unet": {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                       "use_linear_projection": True, "upcast_attention": True, "sample_size": 96},
              "text_encoder": _OPENCLIP_H},
    "sdxl": {"unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                      "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
                      "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                      "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
             "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG},
}
FAMILY = {"sd1": ("sd1", "epsilon"), "sd2-v": ("sd2", "v_prediction"), "sdxl": ("sdxl", "epsilon")}
ARCHITECTURES = tuple(FALLBACK)
ROOT = Path(__file__).resolve().parents[3]


def configs(name: str) -> dict[str, dict]:
    """UNet and text-encoder config dicts: the bundled resources/model_configs/<name>/ when present."""
    folder = ROOT / "resources" / "model_configs" / name
    out = {}
    for part in FALLBACK[name]:
        path = folder / part / "config.json"
        out[part] = json.loads(path.read_text()) if path.is_file() else FALLBACK[name][part]
    return out


def meta_bundle(name: str):
    """A ModelBundle of the full-size architecture on the meta device (VAE, tokenizers and scheduler left out)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.engine.checkpoint import ModelBundle
    from studio.engine.families import get_family

    cfg = configs(name)
    family, prediction = FAMILY[name]
    unet_cfg = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        encoders = [CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))]
        if "text_encoder_2" in cfg:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))
    return ModelBundle(get_family(family), prediction, unet, None, encoders, [], None, f"meta:{name}")


def golden_path(name: str, preset: str) -> Path:
    return Path(__file__).resolve().parent / f"{name}_{preset.replace('+', 'plus-')}.txt"
