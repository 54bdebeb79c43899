"""Write the bundled diffusers config folders (sd1, sd2, sd2-v, sdxl) that single-file checkpoints load through.

The values are those of the reference models' own configs (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0);
only the safety checker and the tokenizers are left out: every family uses a bundled CLIP tokenizer from
``resources/tokenizers`` (the family module names it, see studio/engine/families/), so the vocabulary is not
stored once per folder. Run::

    python resources/model_configs/make_model_configs.py

and commit the result; tests/engine/test_checkpoint.py checks the folders match this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.42.1",
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
}
_SD_BLOCKS = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
UNET = {
    "sd1": {**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64,
            "use_linear_projection": False, "upcast_attention": False},
    "sd2": {**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "sample_size": 64, "use_linear_projection": True, "upcast_attention": False},
    # SD2.1-768 computes attention in fp32 (its config says so since the fp16 NaN fix).
    "sd2-v": {**_UNET_COMMON, **_SD_BLOCKS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
              "sample_size": 96, "use_linear_projection": True, "upcast_attention": True},
    "sdxl": {
        **_UNET_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
}


def _vae(sample_size: int, scaling_factor: float, force_upcast: bool) -> dict:
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": force_upcast,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


VAE = {
    "sd1": _vae(512, 0.18215, True),
    "sd2": _vae(768, 0.18215, True),
    "sd2-v": _vae(768, 0.18215, True),
    # SDXL's VAE overflows in fp16, hence force_upcast (as in the reference config).
    "sdxl": _vae(1024, 0.13025, True),
}


def _clip(architecture: str, hidden: int, intermediate: int, heads: int, layers: int, act: str, projection: int) -> dict:
    # bos/eos/pad ids as in the reference configs: eos_token_id 2 makes transformers pool at the highest
    # token id (the real end token, 49407), which is what these models were trained with.
    return {
        "architectures": [architecture],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "torch_dtype": "float32",
        "vocab_size": 49408,
    }


CLIP_L = _clip("CLIPTextModel", 768, 3072, 12, 12, "quick_gelu", 768)
# SD2 uses OpenCLIP ViT-H's penultimate layer, so the reference config keeps 23 of its 24 layers.
OPENCLIP_H = _clip("CLIPTextModel", 1024, 4096, 16, 23, "gelu", 512)
OPENCLIP_BIGG = _clip("CLIPTextModelWithProjection", 1280, 5120, 20, 32, "gelu", 1280)

_SCHEDULER_COMMON = {
    "_diffusers_version": "0.42.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SCHEDULER = {
    "sd1": {"_class_name": "PNDMScheduler", **_SCHEDULER_COMMON, "prediction_type": "epsilon"},
    "sd2": {"_class_name": "PNDMScheduler", **_SCHEDULER_COMMON, "prediction_type": "epsilon"},
    "sd2-v": {"_class_name": "DDIMScheduler", **_SCHEDULER_COMMON, "prediction_type": "v_prediction"},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_COMMON, "interpolation_type": "linear",
             "prediction_type": "epsilon", "sample_max_value": 1.0, "timestep_spacing": "leading",
             "use_karras_sigmas": False},
}


def _sd_index(scheduler: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


MODEL_INDEX = {
    "sd1": _sd_index("PNDMScheduler"),
    "sd2": _sd_index("PNDMScheduler"),
    "sd2-v": _sd_index("DDIMScheduler"),
    "sdxl": {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
}

# (text encoder subfolder, config)
TEXT = {
    "sd1": [("text_encoder", CLIP_L)],
    "sd2": [("text_encoder", OPENCLIP_H)],
    "sd2-v": [("text_encoder", OPENCLIP_H)],
    "sdxl": [("text_encoder", CLIP_L), ("text_encoder_2", OPENCLIP_BIGG)],
}

NAMES = ("sd1", "sd2", "sd2-v", "sdxl")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(root: Path) -> None:
    for name in NAMES:
        folder = root / name
        _write_json(folder / "model_index.json", MODEL_INDEX[name])
        _write_json(folder / "unet" / "config.json", UNET[name])
        _write_json(folder / "vae" / "config.json", VAE[name])
        _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER[name])
        for te_dir, te_config in TEXT[name]:
            _write_json(folder / te_dir / "config.json", te_config)


if __name__ == "__main__":
    write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
