"""Load SD1.x/SD2.x/SDXL models offline: diffusers folders, and single files in the original (LDM/SGM) layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.families.base import ModelBundle
from studio.engine.families.loading import (
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, configured_prediction, weights_variant,
)
from studio.engine.ldm import UNET, VAE
from studio.engine.jsonfile import JsonFileError
from studio.engine.model_configs import INDEX, UNET_CONFIG, read_config, read_folder_configs
from studio.engine.safe_load import ModelLoadError, WeightsFile, open_weights, read_safetensors_header

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.detect import Detection
    from studio.engine.families.sd import StableDiffusionFamily

PREDICTIONS = ("epsilon", "v_prediction")


def unet_family_name(config: Any, text_encoder_count: int) -> str:
    """Tell the family from a diffusers UNet config (folders carry no family name)."""
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    if text_encoder_count == 2 or get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2 uses a fixed head width (attention_head_dim is a list of per-block head counts) and linear projections.
    if get("use_linear_projection", False) or isinstance(get("attention_head_dim"), (list, tuple)):
        return "sd2"
    return "sd1"


def tokenizer_folder(text_encoder: str) -> str:
    """The tokenizer subfolder that goes with a text encoder subfolder: text_encoder_2 → tokenizer_2."""
    return text_encoder.replace("text_encoder", "tokenizer", 1)


def noise_scheduler(config_dir: Path, prediction: str, zero_snr: bool = False) -> Any:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    overrides: dict[str, Any] = {"prediction_type": prediction}
    if zero_snr:
        # Files marked "ztsnr" were trained with zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise
        # Schedules and Sample Steps are Flawed"); their noise schedule must be rescaled the same way.
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(scheduler.config, **overrides)


def config_tokenizers(config_dir: Path, family: "StableDiffusionFamily") -> list[Any]:
    from transformers import CLIPTokenizer

    from studio.engine.tokenizers import load_tokenizer

    out = []
    for encoder, bundled in zip(family.text_encoder_names, family.tokenizer_names):
        sub = config_dir / tokenizer_folder(encoder)
        # A config folder the user chose may carry its own tokenizer; the bundled folders do not.
        out.append(CLIPTokenizer.from_pretrained(sub, local_files_only=True) if (sub / "vocab.json").is_file()
                   else load_tokenizer(bundled))
    return out


def normalise_state_dict(w: WeightsFile, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors diffusers' converters expect: EMA copies and buffers dropped, old CLIP names fixed."""
    wanted = [k for k in (list(w.shapes) if keys is None else keys)
              if not k.startswith("model_ema.") and not k.endswith("position_ids") and k not in ("v_pred", "ztsnr")]
    tensors = w.tensors(wanted)
    out = {}
    for key, value in tensors.items():
        for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."):
            # Some older SD1 merges saved the CLIP text model without its "text_model." level.
            if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
                key = prefix + "text_model." + key[len(prefix):]
        out[key] = value
    return out


def vae_state_dict(vae_path: Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (original or diffusers layout, or a full checkpoint) as ``first_stage_model.*`` tensors."""
    from studio.engine.detect import detect

    w = open_weights(vae_path)
    keys = list(w.shapes)
    if any(k.startswith(VAE) for k in keys):
        return {k: v for k, v in w.tensors([k for k in keys if k.startswith(VAE)]).items()}
    det = detect(w.shapes, w.metadata, vae_path.name)
    if det.kind != "vae":
        raise ModelLoadError(f"'{vae_path.name}' was given as the VAE but is {det.architecture}, not a VAE")
    usable = [k for k in keys if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    tensors = w.tensors(usable)
    if det.architecture == "VAE (diffusers layout)":
        return tensors  # already diffusers names: from_single_file uses them as they are
    return {VAE + k: v for k, v in tensors.items()}


def load_single_file(family: "StableDiffusionFamily", path: Path, w: WeightsFile, det: "Detection",
                     model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    name = path.name
    prediction = model.prediction_type if model.prediction_type != "auto" else det.prediction_type or "epsilon"
    prediction_source = "your setting (model.prediction_type)" if model.prediction_type != "auto" else det.prediction_source
    if model.config_dir:
        config_dir = Path(model.config_dir).expanduser()
        if not (config_dir / "unet" / "config.json").is_file():
            raise ModelLoadError(f"model.config_dir '{config_dir}' is not a diffusers config folder (no unet/config.json)")
        configured = configured_prediction(config_dir, PREDICTIONS)
        # A config folder the user chose outranks guesses, but not what the file itself declares.
        if model.prediction_type == "auto" and configured and not det.prediction_source.startswith(("marker", "metadata")):
            prediction, prediction_source = configured, "the scheduler config in model.config_dir"
    else:
        if not det.standard_size:
            raise ModelLoadError(
                f"'{name}' has the layout of {det.architecture} but unusual sizes, so the bundled configuration does "
                "not fit; set model.config_dir to a diffusers folder with this model's configs"
            )
        config_dir = family.bundled_config_dir(prediction)
    check_config_fits(w, config_dir, name)

    unet_keys = [k for k in w.shapes if k.startswith(UNET)]
    te_prefixes = family.file_component_prefixes()
    kw = {"config": str(config_dir), "torch_dtype": dtype, "local_files_only": True}

    unet = UNet2DConditionModel.from_single_file(normalise_state_dict(w, unet_keys), subfolder="unet", **kw)
    check_complete(unet, "UNet", name)

    if model.vae:
        vae_path = Path(model.vae).expanduser()
        vae_sd = vae_state_dict(vae_path)
        vae_name = vae_path.name
    else:
        vae_sd = normalise_state_dict(w, [k for k in w.shapes if k.startswith(VAE)])
        vae_name = name
        if not vae_sd:
            raise ModelLoadError(f"'{name}' has no VAE inside; set model.vae to a VAE file (e.g. the one the model page recommends)")
    vae = AutoencoderKL.from_single_file(vae_sd, subfolder="vae", **kw)
    check_complete(vae, "VAE", vae_name)

    encoders = []
    for index, (sub, cls) in enumerate(zip(family.text_encoder_names, family.text_encoder_classes())):
        keys = [k for k in w.shapes if k.startswith(te_prefixes[sub])]
        # Each encoder gets only its own weights: diffusers' converter picks the layout by key names, and with
        # both encoders present it could take the wrong one when their widths match.
        encoder = create_diffusers_clip_model_from_ldm(cls, normalise_state_dict(w, keys), subfolder=sub,
                                                       config=str(config_dir), torch_dtype=dtype, local_files_only=True)
        check_complete(encoder, "text encoder" if index == 0 else "second text encoder", name)
        encoders.append(encoder)

    if unet.config.in_channels != 4:
        raise ModelLoadError(f"'{name}': the configuration gives the UNet {unet.config.in_channels} input channels; "
                             "LoRA Studio trains text-to-image models (4)")
    scheduler = noise_scheduler(config_dir, prediction, det.zero_terminal_snr)
    tokenizers = config_tokenizers(config_dir, family)
    extra = {"format": w.format, "detection": det, "config_dir": str(config_dir), "prediction_source": prediction_source}
    if model.family != "auto" and det.family and model.family != det.family:
        extra["warning"] = f"model.family is {model.family} but the weights look like {det.architecture}"
    return ModelBundle(family, prediction, unet, vae, encoders, tokenizers, scheduler, str(path), extra=extra)


def check_config_fits(w: WeightsFile, config_dir: Path, name: str) -> None:
    """Compare a few widths with the config before building anything, for a clear message instead of a shape error."""
    try:
        unet = read_config(config_dir, UNET_CONFIG)
    except JsonFileError as exc:
        raise ModelLoadError(f"The model configuration cannot be used: {exc}") from None
    conv_in = w.shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in and len(conv_in) == 4 and conv_in[0] != unet.get("block_out_channels", [conv_in[0]])[0]:
        raise ModelLoadError(
            f"'{name}' does not fit the configuration in '{config_dir.name}' (UNet width {conv_in[0]}, config "
            f"{unet['block_out_channels'][0]}); set model.config_dir to this model's diffusers configs"
        )
    contexts = {shape[1] for key, shape in w.shapes.items()
                if key.startswith(UNET) and key.endswith("attn2.to_k.weight") and len(shape) == 2}
    if contexts and unet.get("cross_attention_dim") not in contexts:
        raise ModelLoadError(
            f"'{name}' does not fit the configuration in '{config_dir.name}' (text width {sorted(contexts)[0]}, config "
            f"{unet.get('cross_attention_dim')}); set model.family/model.config_dir to match the model"
        )


def unet_in_channels_problem(folder: Path) -> str | None:
    """Why a folder's UNet cannot be trained for text-to-image (inpainting/editing inputs), or None."""
    try:
        config = read_config(folder, UNET_CONFIG)
    except JsonFileError:
        return None
    channels = config.get("in_channels", 4)
    if channels != 4:
        return (f"this is an inpainting or image-editing model (its UNet takes {channels} input channels); "
                "use the text-to-image version")
    return None


def load_folder(family: "StableDiffusionFamily", path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from studio.engine.families import supported_text

    if not (path / "unet").is_dir():
        index = read_folder_configs(path, (INDEX,)).get(INDEX) or {}
        raise ModelLoadError(f"'{path.name}' is a {index.get('_class_name') or 'diffusers'} folder; LoRA Studio "
                             f"trains {supported_text()} models")
    for part in (family.denoiser_name, "vae", *family.text_encoder_names):
        for weights in sorted((path / part).glob("*.safetensors")) if (path / part).is_dir() else []:
            read_safetensors_header(weights)  # a damaged or renamed file gets our sentence, not SafetensorError's
    problem = unet_in_channels_problem(path)
    if problem:
        raise ModelLoadError(f"'{path.name}' is {problem.removeprefix('this is ')}")
    kw = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=weights_variant(path / "unet", DIFFUSERS_WEIGHTS), **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=weights_variant(path / "vae", DIFFUSERS_WEIGHTS), **kw)
        text_encoders, tokenizers = [], []
        for sub, cls in zip(family.text_encoder_names, family.text_encoder_classes()):
            text_encoders.append(cls.from_pretrained(path, subfolder=sub,
                                                     variant=weights_variant(path / sub, TRANSFORMERS_WEIGHTS), **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_folder(sub), local_files_only=True))
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"'{path}' looks like a diffusers folder but a part could not be read: {exc}") from exc
    prediction = model.prediction_type if model.prediction_type != "auto" else scheduler.config.prediction_type
    if model.prediction_type != "auto":
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction)
    if model.vae:
        vae = separate_vae(Path(model.vae).expanduser(), path, dtype)
    extra = {"format": "diffusers", "prediction_source": "your setting (model.prediction_type)"
             if model.prediction_type != "auto" else "the folder's scheduler config"}
    return ModelBundle(family, prediction, unet, vae, text_encoders, tokenizers, scheduler, str(path), extra=extra)


def separate_vae(vae_path: Path, config_dir: Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_single_file(vae_state_dict(vae_path), config=str(config_dir), subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True)
    check_complete(vae, "VAE", vae_path.name)
    return vae
