"""What differs between SD1.x, SD2.x and SDXL: text encoders, conditioning, metadata names. One loop serves all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl"
    label: str
    native_resolution: int
    text_encoder_count: int
    kohya_te_prefixes: tuple[str, ...]  # one per text encoder
    # Which hidden state of each text encoder conditions the UNet: SDXL uses the penultimate layer.
    penultimate_hidden: bool
    tokenizer_dirs: tuple[str, ...]  # bundled tokenizers (studio.engine.tokenizers)

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    def base_model_version(self, prediction_type: str) -> str:
        """kohya's ``ss_base_model_version``, by which A1111 decides where a LoRA is listed."""
        if self.name == "sd1":
            return "sd_v1"
        if self.name == "sd2":
            return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str, resolution: int | None = None) -> str:
        """Stability's ``modelspec.architecture`` for a LoRA of this family."""
        if self.name == "sd1":
            return "stable-diffusion-v1/lora"
        if self.name == "sd2":
            if prediction_type == "v_prediction":
                return "stable-diffusion-v2-768-v/lora"
            return "stable-diffusion-v2-512/lora"
        return "stable-diffusion-xl-v1-base/lora"


SD1 = Family("sd1", "Stable Diffusion 1.x", 512, 1, ("lora_te",), False, ("clip-l",))
SD2 = Family("sd2", "Stable Diffusion 2.x", 768, 1, ("lora_te",), False, ("clip-g",))
SDXL = Family("sdxl", "Stable Diffusion XL", 1024, 2, ("lora_te1", "lora_te2"), True, ("clip-l", "clip-g"))
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family '{name}'; supported: {', '.join(FAMILIES)}") from None


def family_of_unet_config(config: Any, text_encoder_count: int) -> Family:
    """Tell the family from a loaded diffusers UNet config (folders carry no family name)."""
    if text_encoder_count == 2 or getattr(config, "addition_embed_type", None) == "text_time":
        return SDXL
    head_dim = config.attention_head_dim
    # SD2 uses a fixed head width (attention_head_dim is a list of per-block head counts) and linear projections.
    if getattr(config, "use_linear_projection", False) or isinstance(head_dim, (list, tuple)):
        return SD2
    return SD1


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@dataclass
class Conditioning:
    """What the UNet needs besides the noisy latents: per-token states and, for SDXL, pooled text + time ids."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        return Conditioning(self.hidden_states.to(device, dtype), pooled)

    def index(self, idx: Any) -> "Conditioning":
        return Conditioning(self.hidden_states[idx], self.pooled[idx] if self.pooled is not None else None)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])  # type: ignore[misc]
        return Conditioning(torch.cat([c.hidden_states for c in items]), pooled)


def encode_tokens(family: Family, text_encoders: list[Any], token_ids: list[torch.Tensor]) -> Conditioning:
    """Run the text encoder(s) on token ids (one tensor per encoder) the way each family's pipeline does."""
    if not family.is_sdxl:
        out = text_encoders[0](token_ids[0].to(text_encoders[0].device), output_hidden_states=False)
        return Conditioning(out[0])
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder (with projection) supplies the pooled embedding
    return Conditioning(torch.cat(states, dim=-1), pooled)


def encode_prompts(family: Family, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str]) -> Conditioning:
    return encode_tokens(family, text_encoders, [tokenize(t, prompts) for t in tokenizers])


def sdxl_time_ids(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left and target size (Podell et al. 2023, §2.2)."""
    return torch.tensor([*original_hw, *crop_tl, *target_hw], dtype=torch.float32)


def unet_added_cond(family: Family, cond: Conditioning, time_ids: torch.Tensor | None) -> dict | None:
    if not family.is_sdxl:
        return None
    assert cond.pooled is not None and time_ids is not None
    return {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.device, cond.pooled.dtype)}
