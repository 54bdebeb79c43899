"""Tell what a weight file is from its key names and shapes: a registered family's model, or why it is not a base model.

The generic kinds (LoRA, embedding, VAE, parts, other architectures) are told here; whether a file is a model of
a family, and which prediction type it has, each family tells (``Family.detect_file``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from studio.engine.ldm import VAE

if TYPE_CHECKING:  # pragma: no cover
    import torch


# Other architectures, recognised so the message can name them (key fragments seen in their checkpoints).
_OTHER_ARCHITECTURES: list[tuple[str, tuple[str, ...]]] = [
    ("Stable Diffusion 3 / 3.5", ("joint_blocks.0.context_block.", "joint_blocks.0.x_block.")),
    ("FLUX.2", ("single_stream_modulation.",)),
    ("Chroma", ("distilled_guidance_layer.",)),
    ("FLUX.1", ("double_blocks.0.img_attn.", "single_blocks.0.linear1.")),
    ("AuraFlow", ("double_layers.0.attn.w1q.", "cond_seq_linear.")),
    ("HunyuanVideo", ("txt_in.individual_token_refiner.",)),
    ("HiDream", ("double_stream_blocks.0.block.",)),
    ("Stable Cascade", ("down_blocks.1.0.channelwise.", "clip_txt_mapper.")),
    ("Lumina 2 / Z-Image", ("cap_embedder.",)),
    ("Wan (video)", ("head.modulation",)),
    ("LTX-Video", ("patchify_proj.",)),
    ("Mochi (video)", ("blocks.0.attn.qkv_x.",)),
    ("Qwen-Image", ("txt_norm.",)),
    ("PixArt / Sana", ("blocks.0.cross_attn.q_linear.",)),
    ("Kolors", ("encoder_hid_proj.",)),
    ("ControlNet", ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")),
    ("AnimateDiff motion module", ("motion_modules.",)),
    ("AltDiffusion", ("cond_stage_model.roberta.",)),
]

_LORA_FRAGMENTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te_", "lora_te1_",
                   "lora_te2_", ".lora.down.", ".lora.up.")
_LYCORIS_FRAGMENTS = (".hada_w1_a", ".lokr_w1", ".oft_blocks", ".oft_diag", ".lokr_w2")
_EMBEDDING_KEYS = {"emb_params", "string_to_param", "clip_l", "clip_g", "string_to_token", "name"}


@dataclass
class Detection:
    """What a file is. ``problem`` is set (a sentence for the user) when it cannot be used as a base model."""

    kind: str  # "checkpoint" | "lora" | "vae" | "embedding" | "component" | "other" | "unknown"
    architecture: str  # human name, e.g. "Stable Diffusion 1.x" or "FLUX.1"
    family: str | None = None  # a registered family's name, e.g. "sd1"
    prediction_type: str | None = None
    prediction_source: str = ""
    native_resolution: int | None = None
    in_channels: int | None = None
    components: dict[str, bool] = field(default_factory=dict)
    has_ema: bool = False
    zero_terminal_snr: bool = False
    standard_size: bool = True  # False: a family's layout at unusual sizes (needs model.config_dir)
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.kind == "checkpoint" and self.problem is None


def first_match(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> tuple[str, tuple[int, ...]] | None:
    """The first key (and its shape) the regular expression finds."""
    rx = re.compile(pattern)
    for key, shape in shapes.items():
        if rx.search(key):
            return key, shape
    return None


def has_prefix(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _strip(prefix: str, keys: list[str]) -> list[str]:
    return [k[len(prefix):] if k.startswith(prefix) else k for k in keys]


def detect(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    filename: str = "",
    tensor: Callable[[str], torch.Tensor] | None = None,
) -> Detection:
    """Classify a state dict by its key names and shapes.

    ``tensor`` (optional) reads one tensor; it lets a family's prediction-type rule look at a weight.
    """
    metadata = dict(metadata or {})
    keys = list(shapes)
    if not keys:
        return Detection("unknown", "empty file", problem="the file holds no weights")

    # LoRA and friends first: their key names are distinctive and they are the most common mix-up.
    if any(f in k for k in keys for f in _LYCORIS_FRAGMENTS):
        return Detection("lora", "LyCORIS network (LoHa/LoKr/OFT)",
                         problem="this is a LyCORIS network (LoHa/LoKr/OFT), not a base model; choose a full checkpoint")
    if any(f in k for k in keys for f in _LORA_FRAGMENTS) or metadata.get("ss_network_module"):
        return Detection("lora", "LoRA", problem="this is a LoRA, not a base model; choose the checkpoint it was "
                                                "trained for as the base model (a LoRA is applied on top of one)")
    if set(keys) <= _EMBEDDING_KEYS or has_prefix(keys, "string_to_param.") or (
        set(keys) <= {"clip_l", "clip_g"}
    ):
        return Detection("embedding", "textual-inversion embedding",
                         problem="this is a textual-inversion embedding, not a base model")

    from studio.engine.families import detect_file

    found = detect_file(shapes, metadata, filename, tensor)
    if found is not None:
        return found
    other = other_architecture(shapes)
    if other is not None:
        label, problem = other
        return Detection("other", label, problem=problem)
    return _without_unet(shapes, keys)


def other_architecture(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """(name, problem) when the keys carry the marks of an architecture no registered family trains."""
    from studio.engine.families import supported_text

    keys = list(shapes)
    for label, fragments in _OTHER_ARCHITECTURES:
        if any(f in k for k in keys for f in fragments):
            return label, f"this is a {label} model; LoRA Studio trains {supported_text()} checkpoints"
    if "edm_mean" in shapes or "edm_vpred.sigma_max" in shapes:
        return ("Playground v2.5 / CosXL (EDM)",
                "this model uses EDM sampling (Playground v2.5 / CosXL), which LoRA Studio cannot train")
    return None


def _without_unet(shapes: Mapping[str, tuple[int, ...]], keys: list[str]) -> Detection:
    bare = _strip(VAE, keys)
    if any(k.startswith("encoder.conv_in.") for k in bare) and any(k.startswith("decoder.") for k in bare):
        if any(".down_blocks." in k or ".mid_block." in k for k in bare):
            return Detection("vae", "VAE (diffusers layout)",
                             problem="this is a VAE, not a full model; set it as the model's VAE (model.vae)")
        return Detection("vae", "VAE", problem="this is a VAE, not a full model; set it as the model's VAE (model.vae)")
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys) and "conv_in.weight" in shapes:
        return Detection("component", "diffusers UNet",
                         problem="this is the UNet of a diffusers folder; choose the whole folder (the one with "
                                 "model_index.json) instead")
    if any(k.startswith(("text_model.", "encoder.layers.", "transformer.resblocks.")) for k in keys) or any(
        k.startswith(("cond_stage_model.", "conditioner.")) for k in keys
    ):
        return Detection("component", "text encoder",
                         problem="this file holds only a text encoder, not a full Stable Diffusion model")
    return Detection("unknown", "unrecognised weights",
                     problem="this is not a Stable Diffusion checkpoint LoRA Studio recognises (no UNet weights)")
