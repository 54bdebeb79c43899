"""Tell what a weight file is from its key names and shapes: SD family, prediction type, or why it is not a base model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each component's weights live in the original (LDM/SGM) layout.
COMPONENT_PREFIXES = {
    "unet": (UNET,),
    "vae": (VAE,),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}

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
    family: str | None = None  # "sd1" | "sd2" | "sdxl"
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


def _first(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> tuple[str, tuple[int, ...]] | None:
    rx = re.compile(pattern)
    for key, shape in shapes.items():
        if rx.search(key):
            return key, shape
    return None


def _has_prefix(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _strip(prefix: str, keys: list[str]) -> list[str]:
    return [k[len(prefix):] if k.startswith(prefix) else k for k in keys]


def detect(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    filename: str = "",
    tensor: Callable[[str], torch.Tensor] | None = None,
) -> Detection:
    """Classify a state dict by its key names and shapes (our own rules; diffusers' guess defaults to SD1).

    ``tensor`` (optional) reads one tensor; it lets the SD2 prediction-type rule look at a weight.
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
    if set(keys) <= _EMBEDDING_KEYS or _has_prefix(keys, "string_to_param.") or (
        set(keys) <= {"clip_l", "clip_g"}
    ):
        return Detection("embedding", "textual-inversion embedding",
                         problem="this is a textual-inversion embedding, not a base model")

    for label, fragments in _OTHER_ARCHITECTURES:
        if any(f in k for k in keys for f in fragments):
            return Detection("other", label, problem=f"this is a {label} model; LoRA Studio trains Stable Diffusion "
                                                      "1.x, 2.x and SDXL checkpoints")
    if "edm_mean" in shapes or "edm_vpred.sigma_max" in shapes:
        return Detection("other", "Playground v2.5 / CosXL (EDM)",
                         problem="this model uses EDM sampling (Playground v2.5 / CosXL), which LoRA Studio cannot train")

    unet_keys = [k for k in keys if k.startswith(UNET)]
    if not unet_keys:
        return _without_unet(shapes, keys)

    # ------------------------------------------------------------------ a Stable Diffusion-style UNet
    components = {
        "unet": True,
        "vae": _has_prefix(keys, VAE),
        "text_encoder": _has_prefix(keys, "cond_stage_model.", "conditioner.embedders.0."),
        "text_encoder_2": _has_prefix(keys, "conditioner.embedders.1."),
    }
    in_key = shapes.get(UNET + "input_blocks.0.0.weight")
    in_channels = in_key[1] if in_key and len(in_key) == 4 else None
    context = _first(shapes, r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")
    context_dim = context[1][1] if context and len(context[1]) == 2 else None
    label_emb = shapes.get(UNET + "label_emb.0.0.weight")
    adm = label_emb[1] if label_emb and len(label_emb) == 2 else None
    proj_in = _first(shapes, r"^model\.diffusion_model\..*\.proj_in\.weight$")
    linear_proj = bool(proj_in and len(proj_in[1]) == 2)
    openclip_sd2 = _has_prefix(keys, "cond_stage_model.model.")
    clip_l_sd1 = _has_prefix(keys, "cond_stage_model.transformer.")
    sdxl_te = components["text_encoder_2"]
    refiner_te = _has_prefix(keys, "conditioner.embedders.0.model.") and not sdxl_te

    det = Detection("checkpoint", "", in_channels=in_channels, components=components)
    det.has_ema = sum(k.startswith("model_ema.") for k in keys) > 100
    det.zero_terminal_snr = "ztsnr" in shapes

    if adm is not None or sdxl_te or refiner_te:
        if refiner_te or adm == 2560 or context_dim == 1280:
            det.architecture, det.family = "SDXL refiner", "sdxl"
            det.problem = ("this is the SDXL refiner, which only polishes images from the SDXL base model; "
                           "train on an SDXL base model (or a fine-tune of it) instead")
            return det
        if adm in (1536, 2048) and context_dim == 1024:
            det.architecture, det.family = "Stable Diffusion 2.1 unCLIP", "sd2"
            det.problem = "this is an SD 2.1 unCLIP (image variations) model, which LoRA Studio cannot train"
            return det
        det.family, det.architecture = "sdxl", "Stable Diffusion XL"
        det.standard_size = adm == 2816 and context_dim == 2048
    elif context_dim == 768 or (context_dim != 1024 and not linear_proj and not openclip_sd2):
        det.family, det.architecture = "sd1", "Stable Diffusion 1.x"
        det.standard_size = context_dim == 768
    elif context_dim == 1024 or linear_proj or openclip_sd2:
        det.family, det.architecture = "sd2", "Stable Diffusion 2.x"
        det.standard_size = context_dim == 1024
    if clip_l_sd1 and det.family == "sd2" or openclip_sd2 and det.family == "sd1":
        det.notes.append("the text encoder does not match the UNet's family; the UNet decides")

    special = {9: "an inpainting model", 8: "an instruct-pix2pix (image editing) model", 7: "an upscaler model",
               5: "a depth-to-image model"}
    if _has_prefix(keys, "depth_model."):
        in_channels = 5
    if in_channels is not None and in_channels != 4:
        what = special.get(in_channels, f"a model with {in_channels} input channels")
        det.architecture = f"{det.architecture} ({what.split(' ', 1)[1].removesuffix(' model')})"
        det.problem = (f"this is {what} (its UNet takes {in_channels} input channels, a text-to-image model takes 4); "
                       "LoRA Studio trains text-to-image checkpoints — use the regular version of this model")
        return det

    missing = [name for name in ("text_encoder", "vae") if not components[name]]
    if det.family == "sdxl" and not components["text_encoder_2"]:
        missing.insert(0, "second text encoder")
    if "text_encoder" in missing or "second text encoder" in missing:
        det.problem = ("this file holds only part of a model (no text encoder); LoRA Studio needs a full checkpoint "
                       "with UNet, text encoder(s) and VAE")
    elif not components["vae"]:
        det.notes.append("no VAE inside: set model.vae to a VAE file")

    _prediction(det, shapes, metadata, filename, tensor)
    if det.family == "sd1":
        det.native_resolution = 512
    elif det.family == "sd2":
        det.native_resolution = 768 if det.prediction_type == "v_prediction" else 512
    elif det.family == "sdxl":
        det.native_resolution = 1024
    return det


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


_V_NAME = re.compile(r"(?:^|[^a-z0-9])(?:v[-_ ]?pred(?:iction)?|vpred|768[-_ ]?v)(?:[^a-z0-9]|$)")
_EPS_NAME = re.compile(r"(?:^|[^a-z0-9])eps(?:ilon)?(?:[^a-z0-9]|$)")


def _prediction(det: Detection, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str,
                tensor: Callable[[str], torch.Tensor] | None) -> None:
    """Prediction type, most explicit evidence first; the source is kept so the UI can say how sure we are.

    Weights alone cannot prove it, so the order is: markers written by tools (ComfyUI's ``v_pred`` key,
    Stability's ``modelspec.prediction_type``/architecture), then the file name ("768-v", "vpred", "512"),
    then for SD2 only ComfyUI's weight rule, then the family default. The user can always override.
    """
    name = filename.lower()
    spec = metadata.get("modelspec.prediction_type", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    if "v_pred" in shapes:
        det.prediction_type, det.prediction_source = "v_prediction", "marker in the file (v_pred)"
    elif spec in ("v", "v_prediction", "v-prediction"):
        det.prediction_type, det.prediction_source = "v_prediction", "metadata (modelspec.prediction_type)"
    elif spec in ("epsilon", "eps"):
        det.prediction_type, det.prediction_source = "epsilon", "metadata (modelspec.prediction_type)"
    elif arch.endswith("-v") or "-768-v" in arch:
        det.prediction_type, det.prediction_source = "v_prediction", "metadata (modelspec.architecture)"
    elif _V_NAME.search(name):
        det.prediction_type, det.prediction_source = "v_prediction", "file name"
    elif _EPS_NAME.search(name):
        det.prediction_type, det.prediction_source = "epsilon", "file name"
    elif det.family == "sd2" and "768" in name:
        det.prediction_type, det.prediction_source = "v_prediction", "file name (768 → SD2 768-v)"
    elif det.family == "sd2" and "512" in name:
        det.prediction_type, det.prediction_source = "epsilon", "file name (512 → SD2 512-base)"
    elif det.family == "sd2":
        guess = _sd2_weight_rule(shapes, tensor)
        if guess is not None:
            det.prediction_type, det.prediction_source = guess, "guessed from the weights (ComfyUI's rule)"
        else:
            det.prediction_type, det.prediction_source = "v_prediction", "guess: most SD2 models are 768-v"
    else:
        det.prediction_type, det.prediction_source = "epsilon", f"default for {det.architecture or 'the family'}"


# ComfyUI decides SD2's type from how spread out this bias is (v-prediction fine-tuning moved it more).
_SD2_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def _sd2_weight_rule(shapes: Mapping[str, tuple[int, ...]], tensor: Callable[[str], torch.Tensor] | None) -> str | None:
    if tensor is None or _SD2_PROBE not in shapes:
        return None
    try:
        value = tensor(_SD2_PROBE).float()
    except Exception:
        return None
    return "v_prediction" if float(value.std(unbiased=False)) > 0.09 else "epsilon"
