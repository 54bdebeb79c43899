"""Write the bundled FLUX.1 diffusers config folders (flux-dev, flux-schnell) that single files load through.

The values are those of black-forest-labs/FLUX.1-dev and FLUX.1-schnell's own configs (transformer, VAE
"ae", CLIP-L, T5-XXL encoder, scheduler). No tokenizers: CLIP-L's is bundled once (resources/tokenizers/clip);
T5's SentencePiece model is taken from the user's files (studio/engine/families/flux_files.py says which).
Run::

    python resources/model_configs/make_flux_configs.py

and commit the result; tests/engine/test_flux.py checks the folders match this script.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sd_configs():
    # CLIP-L's config is the one SD1 and SDXL use; one definition (make_model_configs.py) for all.
    spec = importlib.util.spec_from_file_location("make_model_configs", HERE / "make_model_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transformer(guidance: bool) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": guidance, "in_channels": 64, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "out_channels": None, "patch_size": 1,
        "pooled_projection_dim": 768,
    }


VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
    "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}

T5_XXL = {
    "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32128,
}


def scheduler(dynamic: bool) -> dict:
    # dev shifts by resolution (mu from the token count); schnell was distilled on an unshifted schedule.
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1", "base_image_seq_len": 256,
        "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
        "shift": 3.0 if dynamic else 1.0, "use_dynamic_shifting": dynamic,
    }


MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

NAMES = ("flux-dev", "flux-schnell")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(root: Path) -> None:
    clip_l = _sd_configs().CLIP_L
    for name in NAMES:
        dev = name == "flux-dev"
        folder = root / name
        _write_json(folder / "model_index.json", MODEL_INDEX)
        _write_json(folder / "transformer" / "config.json", transformer(guidance=dev))
        _write_json(folder / "vae" / "config.json", VAE)
        _write_json(folder / "scheduler" / "scheduler_config.json", scheduler(dynamic=dev))
        _write_json(folder / "text_encoder" / "config.json", clip_l)
        _write_json(folder / "text_encoder_2" / "config.json", T5_XXL)


if __name__ == "__main__":
    write_configs(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
