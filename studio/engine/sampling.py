"""Preview images at fixed prompts and seeds (during training), and base-vs-LoRA generation (Try & Export)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from studio.engine.families import ModelBundle
from studio.engine.config import SamplingSection
from studio.engine.fileio import atomic_write_with


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32 or device.type == "cpu" and dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def render(
    bundle: ModelBundle,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.0,
    width: int,
    height: int,
    autocast_dtype: torch.dtype | None = None,
    cross_attention_scale: float | None = None,
) -> Image.Image:
    """One image from the bundle's current weights (LoRA layers included, if any are active)."""
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    denoiser = bundle.denoiser
    generator = torch.Generator(device="cpu").manual_seed(seed)  # CPU generator: same image on every device
    kwargs: dict[str, Any] = bundle.family.pipeline_kwargs(negative_prompt=negative_prompt, guidance=guidance,
                                                           lora_scale=cross_attention_scale)
    was_training = denoiser.training
    denoiser.eval()
    try:
        with _autocast(denoiser.device, autocast_dtype):
            out = pipe(prompt, num_inference_steps=steps, width=width, height=height, generator=generator,
                       output_type="pil", **kwargs)
    finally:
        denoiser.train(was_training)
    return out.images[0]


def save_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    """Write a PNG with its prompt and settings in text chunks (as A1111 does), atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def preview_prompts(settings: SamplingSection, trigger_word: str, captions: list[str], limit: int = 2) -> list[str]:
    """The job's prompts with ``{trigger}`` filled in, or the dataset's first distinct captions."""
    prompts = [p.replace("{trigger}", trigger_word).strip() for p in settings.prompts if p.strip()]
    if prompts:
        return prompts
    seen: list[str] = []
    for caption in captions:
        if caption and caption not in seen:
            seen.append(caption)
        if len(seen) == limit:
            break
    return seen or [trigger_word or "a photo"]


def sample_file_name(step: int, index: int) -> str:
    return f"step{step:06d}_{index:02d}.png"


# ------------------------------------------------------------------------------------------- Try & Export


def native_resolution(bundle: ModelBundle) -> int:
    """The size the model was trained at: the VAE config records it (tiny test models are 64 px)."""
    size = getattr(bundle.vae.config, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else bundle.family.native_resolution(bundle.prediction_type)


def _adapter_name(lora_path: Path) -> str:
    st = lora_path.stat()
    return "try_" + hashlib.sha1(f"{lora_path.resolve()}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:10]


def generate(
    bundle: ModelBundle,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.0,
    width: int | None = None,
    height: int | None = None,
    lora_path: str | Path | None = None,
    lora_scale: float = 1.0,
) -> Image.Image:
    """Generate with the base model, or with a LoRA file at ``lora_scale``; the same seed gives comparable images.

    LoRA files are loaded once per bundle (diffusers' loader, i.e. the same path other tools take) and switched
    on or off per call, so comparing base and LoRA does not reload anything.
    """
    size = {"width": width or native_resolution(bundle), "height": height or native_resolution(bundle)}
    settings = dict(negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, **size)
    pipe = bundle.pipeline()
    loaded: dict[str, str] = bundle.extra.setdefault("try_adapters", {})
    if lora_path is None:
        if loaded:
            pipe.disable_lora()
        try:
            return render(bundle, prompt, **settings)
        finally:
            if loaded:
                pipe.enable_lora()
    path = Path(lora_path)
    name = _adapter_name(path)
    if name not in loaded:
        pipe.load_lora_weights(bundle.family.pipeline_lora(bundle, path), adapter_name=name)
        loaded[name] = str(path)
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[lora_scale])
    return render(bundle, prompt, **settings)
