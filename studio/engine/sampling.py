"""Preview images at fixed prompts and seeds (during training), and base-vs-LoRA generation (Try & Export)."""

from __future__ import annotations

import contextlib
import hashlib
import math
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


# Previews rendered per pipeline call: one call for all prompts costs one denoiser pass per step instead of one per
# prompt; more at once would need the memory of that many images (times two with guidance) at the preview size.
PREVIEW_BATCH = 4


def render(bundle: ModelBundle, prompt: str, *, seed: int = 0, **settings: Any) -> Image.Image:
    """One image from the bundle's current weights (LoRA layers included, if any are active)."""
    return render_many(bundle, [prompt], seeds=[seed], **settings)[0]


@torch.no_grad()
def render_many(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    seeds: list[int],
    negative_prompt: str = "",
    steps: int = 20,
    guidance: float = 7.0,
    width: int,
    height: int,
    autocast_dtype: torch.dtype | None = None,
    cross_attention_scale: float | None = None,
) -> list[Image.Image]:
    """One image per prompt, batched ``PREVIEW_BATCH`` to a pipeline call; each prompt has its own seeded generator,
    so its image is the one a call for it alone would give (up to batched arithmetic)."""
    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    denoiser = bundle.denoiser
    # Sides the pipeline accepts (SD3's refuses others): rounded down to the family's multiple.
    step = bundle.family.image_size_multiple(bundle)
    width, height = max(step, width // step * step), max(step, height // step * step)
    images: list[Image.Image] = []
    with _eval_mode(bundle.modules()), _vae_outside_autocast(bundle.vae):
        for k in range(0, len(prompts), PREVIEW_BATCH):
            part, part_seeds = prompts[k:k + PREVIEW_BATCH], seeds[k:k + PREVIEW_BATCH]
            # CPU generators: the same image on every device.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in part_seeds]
            kwargs: dict[str, Any] = bundle.family.pipeline_kwargs(negative_prompt=negative_prompt, guidance=guidance,
                                                                   lora_scale=cross_attention_scale)
            if isinstance(kwargs.get("negative_prompt"), str):  # pipelines want one per prompt with a list of prompts
                kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(part)
            with _autocast(denoiser.device, autocast_dtype):
                # Encoded once by the run (the text encoders off the device), or long captions and clip skip: the
                # family encodes the prompts as training did.
                embeds = (bundle.extra.get(PREVIEW_EMBEDS, {}).get((tuple(part), negative_prompt))
                          or bundle.family.preview_prompt_kwargs(bundle, list(part), negative_prompt))
                if embeds:
                    kwargs.pop("negative_prompt", None)
                out = pipe(**(embeds or {"prompt": list(part)}), num_inference_steps=steps, width=width,
                           height=height, generator=generators, output_type="pil", **kwargs)
            images += out.images
    return images


PREVIEW_EMBEDS = "preview_embeds"  # bundle.extra: (prompts of one pipeline call, negative prompt) → *_embeds kwargs


def cache_preview_embeds(bundle: ModelBundle, prompts: list[str], negative_prompt: str,
                         autocast_dtype: torch.dtype | None = None) -> bool:
    """Encode the run's preview prompts now, in the batches ``render_many`` calls the pipeline with, so previews need
    no text encoder on the device later (``Family.preview_embeds``); whether the family could (else nothing kept)."""
    cache: dict = {}
    device = bundle.text_encoders[0].device
    for k in range(0, len(prompts), PREVIEW_BATCH):
        part = prompts[k:k + PREVIEW_BATCH]
        with torch.no_grad(), _autocast(device, autocast_dtype):
            embeds = bundle.family.preview_embeds(bundle, list(part), negative_prompt)
        if not embeds:
            return False
        cache[(tuple(part), negative_prompt)] = embeds
    bundle.extra[PREVIEW_EMBEDS] = cache
    return bool(cache)


def preview_embeds_cached(bundle: ModelBundle, prompts: list[str], negative_prompt: str) -> bool:
    """Whether every pipeline call of ``render_many`` for these prompts has its prompts encoded already."""
    cache = bundle.extra.get(PREVIEW_EMBEDS, {})
    return bool(prompts) and all((tuple(prompts[k:k + PREVIEW_BATCH]), negative_prompt) in cache
                                 for k in range(0, len(prompts), PREVIEW_BATCH))


AUTO_PREVIEW_SECONDS = 300.0  # 'auto' previews: about every 5 minutes of training
FALLBACK_PREVIEW_STEPS = 100  # when no estimate is to be had


def auto_preview_cadence(seconds_per_step: float | None) -> int:
    """Steps between previews for about ``AUTO_PREVIEW_SECONDS`` of training, rounded down to 1, 2 or 5 × 10^k
    (steps people recognise: 50, 100, 200, 500)."""
    if not seconds_per_step or not seconds_per_step > 0 or seconds_per_step != seconds_per_step:
        return FALLBACK_PREVIEW_STEPS
    raw = max(1.0, AUTO_PREVIEW_SECONDS / seconds_per_step)
    magnitude = 10 ** int(math.floor(math.log10(raw)))
    return int(max(m * magnitude for m in (1, 2, 5) if m * magnitude <= raw))


@contextlib.contextmanager
def _eval_mode(modules: list[Any]):
    """Every network in eval mode for the preview (LoRA dropout off, on the text encoders too when they train),
    each back in the mode it was in afterwards."""
    was = [(m, m.training) for m in modules]
    for m, _ in was:
        m.eval()
    try:
        yield
    finally:
        for m, training in was:
            m.train(training)


@contextlib.contextmanager
def _vae_outside_autocast(vae: Any):
    """Run the VAE's decode in its own (fp32) dtype even inside the preview's autocast.

    The trainer keeps the VAE in fp32 because SDXL's overflows in fp16; autocast would cast its convolutions to
    fp16 anyway (black/NaN previews on fp16 GPUs). The pipelines all call ``vae.decode``, so shadowing that one
    method on the instance covers every family without knowing its latent layout.
    """
    original = vae.decode

    def decode(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return original(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode


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
    if not diffusers_can_load(path):
        # LoHa/LoKr/DoRA files: diffusers' loader does not convert them, so their ΔW (each adapter type's own
        # formula, as ComfyUI/A1111 apply it) is added to the weights for this image and taken off again.
        from studio.engine.export import LoraFileError, describe_lora
        from studio.engine.merge import bakes_loras

        if not bakes_loras(bundle.family):
            kind = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}.get(describe_lora(path)["network_type"], "LyCORIS")
            raise LoraFileError(f"'{path.name}' is a {kind} file: diffusers cannot load it and LoRA Studio cannot add "
                                f"its update to {bundle.family.label}'s weights yet, so it cannot be tried here; "
                                "use it in ComfyUI or Forge")
        if loaded:
            pipe.disable_lora()
        try:
            with patched_weights(bundle, path, lora_scale):
                return render(bundle, prompt, **settings)
        finally:
            if loaded:
                pipe.enable_lora()
    name = _adapter_name(path)
    if name not in loaded:
        pipe.load_lora_weights(bundle.family.pipeline_lora(bundle, path), adapter_name=name)
        loaded[name] = str(path)
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[lora_scale])
    return render(bundle, prompt, **settings)


def diffusers_can_load(path: Path) -> bool:
    """Whether diffusers' ``load_lora_weights`` reads the file as trained (plain LoRA/LoCon, either layout)."""
    from studio.engine.export import describe_lora

    info = describe_lora(path)
    return info["layout"] == "diffusers" or info["network_type"] in ("lora", "locon")


@contextlib.contextmanager
def patched_weights(bundle: ModelBundle, path: Path, strength: float):
    """The bundle with a kohya/LyCORIS file's deltas added at ``strength``; the original weights come back after."""
    from studio.engine.export import read_lora
    from studio.engine.merge import apply_kohya_lora
    from studio.engine.adapters import read_modules

    tensors, _ = read_lora(path)
    modules = read_modules(tensors)
    index = bundle.family.kohya_index(bundle)
    saved = {name: index[name][1].weight.detach().clone() for name in modules if name in index}
    try:
        apply_kohya_lora(bundle, modules, strength)
        yield bundle
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                index[name][1].weight.copy_(weight)
