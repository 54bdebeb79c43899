"""Write the bundled diffusers config folders of SD3 Medium, SD3.5 Medium and SD3.5 Large (single files load through them).

The values are those of the reference models' own configs (stabilityai/stable-diffusion-3-medium-diffusers,
stabilityai/stable-diffusion-3.5-medium, stabilityai/stable-diffusion-3.5-large). Tokenizers are left out: the
CLIP ones are bundled once (``resources/tokenizers``), T5's comes from the user's model folder (see
studio/engine/families/sd3.py). Run::

    python resources/model_configs/make_sd3_configs.py

and commit the result; tests/engine/test_sd3.py checks the folders match this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIFFUSERS_VERSION = "0.42.1"


def _transformer(layers: int, heads: int, pos_embed_max_size: int, qk_norm: str | None,
                 dual_attention_layers: list[int]) -> dict:
    return {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attention_head_dim": 64,
        "caption_projection_dim": 64 * heads,  # the text stream is as wide as the image stream
        "dual_attention_layers": dual_attention_layers,
        "in_channels": 16,
        "joint_attention_dim": 4096,  # T5-XXL's width; the CLIP states are zero-padded to it
        "num_attention_heads": heads,
        "num_layers": layers,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,  # CLIP-L (768) + CLIP-G (1280) pooled
        "pos_embed_max_size": pos_embed_max_size,
        "qk_norm": qk_norm,
        "sample_size": 128,
    }


TRANSFORMER = {
    "sd3-medium": _transformer(24, 24, 192, None, []),
    # SD3.5 Medium is MMDiT-X: a second self-attention in the first 13 blocks, RMS-normed q/k everywhere.
    "sd3.5-medium": _transformer(24, 24, 384, "rms_norm", list(range(13))),
    "sd3.5-large": _transformer(38, 38, 192, "rms_norm", []),
}

VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": DIFFUSERS_VERSION,
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    # SD3's latents are normalised as (z - shift) * scale before the transformer sees them.
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
}


def _clip(hidden: int, intermediate: int, heads: int, layers: int, act: str) -> dict:
    """SD3's CLIPs: the SD/SDXL script's config with a projection as wide as the encoder, stored in fp16."""
    sys.path.insert(0, str(HERE))
    try:
        from make_model_configs import _clip as sd_clip
    finally:
        sys.path.remove(str(HERE))
    return {**sd_clip("CLIPTextModelWithProjection", hidden, intermediate, heads, layers, act, hidden),
            "torch_dtype": "float16"}


CLIP_L = _clip(768, 3072, 12, 12, "quick_gelu")
CLIP_G = _clip(1280, 5120, 20, 32, "gelu")
T5_XXL = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32128,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

NAMES = tuple(TRANSFORMER)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(root: Path) -> None:
    for name in NAMES:
        folder = root / name
        _write_json(folder / "model_index.json", MODEL_INDEX)
        _write_json(folder / "transformer" / "config.json", TRANSFORMER[name])
        _write_json(folder / "vae" / "config.json", VAE)
        _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER)
        for sub, config in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G), ("text_encoder_3", T5_XXL)):
            _write_json(folder / sub / "config.json", config)


if __name__ == "__main__":
    write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
