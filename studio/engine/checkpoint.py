"""Find, identify and load a base model offline: diffusers folders, the built-in demo model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.engine.config import BUILTIN_DEMO_MODEL, ModelSection
from studio.engine.families import Family, family_of_unet_config, get_family
from studio.paths import user_cache_dir


class ModelLoadError(Exception):
    """A base model that cannot be used; the message says what the file is and what to do."""


@dataclass
class ModelBundle:
    """The parts of a Stable Diffusion model the trainer and sampler need."""

    family: Family
    prediction_type: str  # "epsilon" | "v_prediction"
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any  # DDPMScheduler used for training noise
    source: str
    load_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def pipeline(self) -> Any:
        """A diffusers pipeline sharing these modules (no copies), for sampling."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        if self.family.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def demo_model_path() -> Path:
    """The built-in demo model (a tiny random SD1 model), built once into the user cache."""
    from studio.engine.tiny import save_tiny_model

    folder = user_cache_dir() / "demo-model-sd1"
    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_model(tmp, "sd1")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def resolve_model_path(path: str) -> Path:
    """Turn the job's model path into a local path (the demo model is built on first use)."""
    if path == BUILTIN_DEMO_MODEL:
        return demo_model_path()
    return Path(path).expanduser()


def load_model(model: ModelSection, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ModelBundle:
    """Load the model the job names, offline; raises ModelLoadError with a readable message."""
    started = time.perf_counter()
    path = resolve_model_path(model.path)
    if path.is_dir() and (path / "model_index.json").is_file():
        bundle = _load_diffusers_folder(path, model, dtype)
    elif path.is_dir():
        raise ModelLoadError(
            f"'{path}' is a folder but not a diffusers model (no model_index.json); choose a .safetensors/.ckpt file "
            "or a diffusers folder"
        )
    elif not path.exists():
        raise ModelLoadError(f"'{path}' does not exist; choose a checkpoint file or a diffusers folder")
    else:
        raise ModelLoadError(f"'{path.name}' is not a supported model; choose a diffusers folder")
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.to(device)
    bundle.load_time_s = time.perf_counter() - started
    return bundle


def _load_diffusers_folder(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)]
        if (path / "text_encoder_2").is_dir():
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True))
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"'{path}' looks like a diffusers folder but a part could not be read: {exc}") from exc
    family = get_family(model.family) if model.family != "auto" else family_of_unet_config(unet.config, len(text_encoders))
    prediction = model.prediction_type if model.prediction_type != "auto" else scheduler.config.prediction_type
    if model.prediction_type != "auto":
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction)
    return ModelBundle(family, prediction, unet, vae, text_encoders, tokenizers, scheduler, str(path))
