"""Tell SD1.x, SD2.x and SDXL single files apart by their UNet's key names and shapes, and read the prediction type."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from studio.engine.detect import Detection, first_match, has_prefix, other_architecture
from studio.engine.ldm import UNET, VAE

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.families.base import Family


def detect_sd_checkpoint(family: "Family", shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                         filename: str, tensor: Callable[[str], torch.Tensor] | None) -> Detection | None:
    """A Detection if the file is ``family``'s (SD1, SD2 or SDXL, usable or not), else None.

    Our own rules, not diffusers' guess (which defaults to SD1). Files that carry another architecture's
    marks besides an SD-style UNet (ControlNet, Kolors, Playground's EDM …) are left to be named as such.
    """
    keys = list(shapes)
    if not any(k.startswith(UNET) for k in keys) or other_architecture(shapes) is not None:
        return None
    components = {
        "unet": True,
        "vae": has_prefix(keys, VAE),
        "text_encoder": has_prefix(keys, "cond_stage_model.", "conditioner.embedders.0."),
        "text_encoder_2": has_prefix(keys, "conditioner.embedders.1."),
    }
    in_key = shapes.get(UNET + "input_blocks.0.0.weight")
    in_channels = in_key[1] if in_key and len(in_key) == 4 else None
    context = first_match(shapes, r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")
    context_dim = context[1][1] if context and len(context[1]) == 2 else None
    label_emb = shapes.get(UNET + "label_emb.0.0.weight")
    adm = label_emb[1] if label_emb and len(label_emb) == 2 else None
    proj_in = first_match(shapes, r"^model\.diffusion_model\..*\.proj_in\.weight$")
    linear_proj = bool(proj_in and len(proj_in[1]) == 2)
    openclip_sd2 = has_prefix(keys, "cond_stage_model.model.")
    clip_l_sd1 = has_prefix(keys, "cond_stage_model.transformer.")
    sdxl_te = components["text_encoder_2"]
    refiner_te = has_prefix(keys, "conditioner.embedders.0.model.") and not sdxl_te

    det = Detection("checkpoint", "", in_channels=in_channels, components=components)
    det.has_ema = sum(k.startswith("model_ema.") for k in keys) > 100
    det.zero_terminal_snr = "ztsnr" in shapes

    if adm is not None or sdxl_te or refiner_te:
        if refiner_te or adm == 2560 or context_dim == 1280:
            det.architecture, det.family = "SDXL refiner", "sdxl"
            det.problem = ("this is the SDXL refiner, which only polishes images from the SDXL base model; "
                           "train on an SDXL base model (or a fine-tune of it) instead")
            return det if family.name == "sdxl" else None
        if adm in (1536, 2048) and context_dim == 1024:
            det.architecture, det.family = "Stable Diffusion 2.1 unCLIP", "sd2"
            det.problem = "this is an SD 2.1 unCLIP (image variations) model, which LoRA Studio cannot train"
            return det if family.name == "sd2" else None
        det.family = "sdxl"
        det.standard_size = adm == 2816 and context_dim == 2048
    elif context_dim == 768 or (context_dim != 1024 and not linear_proj and not openclip_sd2):
        det.family = "sd1"
        det.standard_size = context_dim == 768
    elif context_dim == 1024 or linear_proj or openclip_sd2:
        det.family = "sd2"
        det.standard_size = context_dim == 1024
    if det.family != family.name:
        return None
    det.architecture = family.label
    if clip_l_sd1 and det.family == "sd2" or openclip_sd2 and det.family == "sd1":
        det.notes.append("the text encoder does not match the UNet's family; the UNet decides")

    special = {9: "an inpainting model", 8: "an instruct-pix2pix (image editing) model", 7: "an upscaler model",
               5: "a depth-to-image model"}
    if has_prefix(keys, "depth_model."):
        in_channels = 5
    if in_channels is not None and in_channels != 4:
        what = special.get(in_channels, f"a model with {in_channels} input channels")
        det.architecture = f"{det.architecture} ({what.split(' ', 1)[1].removesuffix(' model')})"
        det.problem = (f"this is {what} (its UNet takes {in_channels} input channels, a text-to-image model takes 4); "
                       "LoRA Studio trains text-to-image checkpoints — use the regular version of this model")
        return det

    missing = [name for name in ("text_encoder", "vae") if not components[name]]
    if "text_encoder_2" in family.text_encoder_names and not components["text_encoder_2"]:
        missing.insert(0, "second text encoder")
    if "text_encoder" in missing or "second text encoder" in missing:
        det.problem = ("this file holds only part of a model (no text encoder); LoRA Studio needs a full checkpoint "
                       "with UNet, text encoder(s) and VAE")
    elif not components["vae"]:
        det.notes.append("no VAE inside: set model.vae to a VAE file")

    _prediction(det, shapes, metadata, filename, tensor)
    det.native_resolution = family.native_resolution(det.prediction_type)
    return det



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
