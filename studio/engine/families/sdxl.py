"""Stable Diffusion XL: the SD recipe with two text encoders (penultimate states, pooled text) and size/crop ids."""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from studio.engine.families.base import Conditioning, ModelBundle
from studio.engine.families.sd import (
    _TINY_TEXT_DIM, StableDiffusionFamily, _inner, _skip_problem, chunked_ids, join_chunks, lora_widths, text_options,
)
from studio.engine.ldm import unet_module_path


def sdxl_time_ids(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left and target size (Podell et al. 2023, §2.2)."""
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)


class SDXLFamily(StableDiffusionFamily):
    """SDXL base: CLIP ViT-L + OpenCLIP ViT-bigG, their penultimate layers side by side, bigG's pooled output and
    the time ids as added conditioning; LoRA names in kohya's SGM (original) layout."""

    text_encoder_names = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    vae_overflow_hint = "SDXL's VAE overflows in fp16 — use the original fp32 VAE or 'sdxl-vae-fp16-fix' (model.vae)"

    def _encoder_labels(self) -> tuple[str, ...]:
        return ("text encoder (CLIP ViT-L)", "second text encoder (OpenCLIP ViT-bigG)")

    def text_encoder_classes(self) -> list[type]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel, CLIPTextModelWithProjection]

    def lora_key_evidence(self, shapes: Mapping[str, tuple[int, ...]], layout: str) -> int:
        keys = list(shapes)
        if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) or any(
            re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in keys
        ):
            return 3  # two text encoders, or the SGM block names only SDXL LoRAs use
        return 2 if self._text_width in lora_widths(shapes, layout, r"attn2[._]to_k[._]") else 0

    # -------------------------------------------------------------------------------------- conditioning

    def encode_text(self, bundle: ModelBundle, captions: list[str]) -> Conditioning:
        """Both encoders' penultimate layers side by side (clip skip k: k layers further in, as diffusers' SDXL
        clip_skip counts), over 75-token pieces for longer captions; the pooled text is the second encoder's on
        the first piece (as kohya's sd-scripts does)."""
        max_tokens, clip_skip = text_options(bundle)
        batch, states, pooled = len(captions), [], None
        for encoder, tokenizer in zip(bundle.text_encoders, bundle.tokenizers):
            ids = chunked_ids(tokenizer, captions, max_tokens)
            _skip_problem(_inner(encoder), clip_skip + 1)
            out = encoder(ids.reshape(-1, ids.shape[-1]).to(encoder.device), output_hidden_states=True)
            states.append(join_chunks(out.hidden_states[-(clip_skip + 1)], batch))
            pooled = out[0].reshape(batch, -1, out[0].shape[-1])[:, 0]  # the second encoder's (with projection)
        return Conditioning(hidden=torch.cat(states, dim=-1), pooled=pooled)

    def preview_prompt_kwargs(self, bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> dict | None:
        if text_options(bundle) == (75, 1):
            return None  # the pipeline's own encoding is the same
        n = len(prompts)
        cond = self.encode_text(bundle, [*prompts, negative_prompt or ""])
        hidden, pooled = cond["hidden"], cond["pooled"]
        negative, negative_pooled = hidden[n:].expand(n, -1, -1), pooled[n:].expand(n, -1)
        if not negative_prompt:  # the pipeline's force_zeros_for_empty_prompt, as without these options
            negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
        return {"prompt_embeds": hidden[:n], "pooled_prompt_embeds": pooled[:n],
                "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}

    def example_conditioning(self, examples: list[Mapping[str, torch.Tensor]],
                             size_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        # The cached crop/size entries live on the CPU: reading them costs no device sync.
        return {"time_ids": torch.stack([sdxl_time_ids(tuple(e["original_hw"].tolist()), tuple(e["crop_tl"].tolist()),
                                                       size_hw) for e in examples])}

    def added_cond_kwargs(self, cond: Conditioning) -> dict | None:
        return {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}

    # ------------------------------------------------------------------------------------------- export

    def kohya_unet_path(self, module_path: str, unet_config: Any) -> str:
        # kohya trains SDXL on the SGM UNet, so every SDXL LoRA in the wild uses the original block numbers.
        if unet_config is None:
            raise ValueError("SDXL UNet names need the UNet config (for the LDM block numbers)")
        return unet_module_path(module_path, unet_config)

    # ------------------------------------------------------------------------------------------ preview

    def pipeline(self, bundle: ModelBundle) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.denoiser,
            scheduler=EulerDiscreteScheduler.from_config(bundle.noise_scheduler.config),
        )

    # --------------------------------------------------------------------------------------- cost model

    def _example_added_cond(self, config: Mapping[str, Any], batch: int) -> dict | None:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}

    # ---------------------------------------------------------------------------------------- test model

    def build_tiny(self, prediction_type: str = "epsilon", seed: int = 0) -> Any:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from studio.engine.tokenizers import load_tokenizer

        torch.manual_seed(seed)
        unet, vae = self._tiny_unet(), self._tiny_vae(0.13025)
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(self._tiny_text_config(False)),
            text_encoder_2=CLIPTextModelWithProjection(self._tiny_text_config(True)),
            tokenizer=load_tokenizer(self.tokenizer_names[0]), tokenizer_2=load_tokenizer(self.tokenizer_names[1]),
            unet=unet, scheduler=self._tiny_scheduler(prediction_type),
        )


SDXL = SDXLFamily(
    name="sdxl", label="Stable Diffusion XL", short_label="SDXL", listed_as="SDXL",
    text_encoder_label="CLIP ViT-L", tokenizer_names=("clip-l", "clip-g"),
    ldm_text_encoder_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    config_folders={"epsilon": "sdxl"}, default_prediction="epsilon", resolutions={"epsilon": 1024},
    lora_ids={"epsilon": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")},
    lora_id_prefixes=("sdxl", "stable-diffusion-xl"),
    checkpoint_architectures={"epsilon": "stable-diffusion-xl-v1-base"},
    # kohya's convention: SGM names for SDXL LoRAs (diffusers names for SD1/SD2), said by the implementation id.
    implementation="https://github.com/Stability-AI/generative-models",
    checkpoint_implementation="https://github.com/Stability-AI/generative-models", ss_v2=False,
    parameters={"denoiser": 2567.5e6, "text_encoders": 123.1e6 + 694.7e6, "vae": 83.7e6}, activations=(6.0, 0.45),
    text_width=2048,
    tiny_unet={"cross_attention_dim": 2 * _TINY_TEXT_DIM, "attention_head_dim": (2, 4), "use_linear_projection": True,
               "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
               "projection_class_embeddings_input_dim": 6 * 8 + _TINY_TEXT_DIM},
    # The v-prediction + zero-terminal-SNR case (NoobAI-XL V-Pred and kin) is tested from a single file.
    tiny_prediction_types=("epsilon",),
)
