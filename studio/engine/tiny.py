"""Tiny random models of each SD family (the demo model and the test fixtures): real architecture, seconds to build."""

from __future__ import annotations

from pathlib import Path

import torch

from studio.engine.families import Family, get_family
from studio.engine.tokenizers import load_tokenizer, write_tokenizer

TINY_RESOLUTION = 64
_TEXT_DIM = 32

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _text_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=_TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=_TEXT_DIM if projection else 512, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1,
    )


def _unet(family: Family):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
    )
    if family.name == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=_TEXT_DIM, attention_head_dim=8)
    if family.name == "sd2":
        return UNet2DConditionModel(
            **common, cross_attention_dim=_TEXT_DIM, attention_head_dim=(2, 4), use_linear_projection=True
        )
    return UNet2DConditionModel(
        **common, cross_attention_dim=2 * _TEXT_DIM, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_DIM,
    )


def _vae(family: Family):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025 if family.is_sdxl else 0.18215,
    )


def build_tiny_pipeline(family_name: str, prediction_type: str = "epsilon", seed: int = 0):
    """A random diffusers pipeline of the family's architecture, small enough to train on a CPU in seconds."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = get_family(family_name)
    torch.manual_seed(seed)
    unet, vae = _unet(family), _vae(family)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type)
    tokenizers = [load_tokenizer(name) for name in family.tokenizer_dirs]
    if family.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(_text_config(False)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(True)), tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(False)), tokenizer=tokenizers[0], unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_model(folder: Path, family_name: str, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build and save a tiny model as a diffusers folder; returns the folder."""
    import shutil

    pipe = build_tiny_pipeline(family_name, prediction_type, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Real SD folders ship vocab.json + merges.txt, not the 3.6 MB tokenizer.json save_pretrained writes; that
    # file also costs ~100 ms of GIL-holding JSON parsing per load, which the window's thread would feel.
    for sub, name in zip(("tokenizer", "tokenizer_2"), get_family(family_name).tokenizer_dirs):
        shutil.rmtree(Path(folder) / sub)
        write_tokenizer(name, Path(folder) / sub)
    return Path(folder)
