"""The limit row: the barest LoRA training loop on the same model and cached inputs (UNet forward + backward + AdamW).

This is what the engine's step would cost if it did nothing but the math: latents and text embeddings are encoded
once before the clock starts, the adapters are peft's (the same targets and rank the engine would inject), and a
step is noise + timesteps -> ``add_noise`` -> UNet forward -> MSE -> backward -> AdamW step -> zero_grad. No event
stream, no accelerate, no clipping, no logging, no checkpoint. ``ours / bare`` is then the engine's whole overhead
(issue 17: it must stay <= 1.05). Written by hand on purpose: a library's loop would add the very overhead it is the
baseline against.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _images_and_captions(dataset_dir: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a benchmark dataset (``make_dataset``: ``img_NNN.jpg`` + ``img_NNN.txt``)."""
    pairs = []
    for image in sorted(Path(dataset_dir).glob("*.jpg")):
        caption = image.with_suffix(".txt")
        pairs.append((image, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    if not pairs:
        raise FileNotFoundError(f"no .jpg images in {dataset_dir}")
    return pairs


def _pixels(path: Path, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1] (what every SD trainer does)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _cache_inputs(model_dir: Path, dataset_dir: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, 4, h, w) and text embeddings (N, 77, d) of the whole dataset, encoded once."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    pairs = _images_and_captions(dataset_dir)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    latents, embeds = [], []
    with torch.no_grad():
        for image, caption in pairs:
            dist = vae.encode(_pixels(image, resolution)[None]).latent_dist
            latents.append(dist.mean * vae.config.scaling_factor)
            ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            embeds.append(text_encoder(ids)[0])
    return torch.cat(latents), torch.cat(embeds)


def bare_run(model_dir: str, dataset_dir: str, *, resolution: int, batch_size: int, steps: int, warmup: int,
             rank: int, target_modules: str, seed: int = 0) -> dict[str, Any]:
    """Train ``steps`` steps of the bare loop; per-step seconds, images/s and peak RSS."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    latents, embeds = _cache_inputs(Path(model_dir), Path(dataset_dir), resolution)
    cache_s = time.perf_counter() - t0
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    count = latents.shape[0]
    durations, cpu = [], []
    for _ in range(steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        idx = rng.sample(range(count), batch_size)
        x0, ctx = latents[idx], embeds[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    steady = durations[warmup:] or durations
    per_step = statistics.median(steady)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "ok": True, "seconds_per_step": per_step, "images_per_s": batch_size / per_step,
        "cpu_seconds_per_step": statistics.median(cpu[warmup:] or cpu), "step_seconds": [round(d, 5) for d in durations],
        "first_step_s": durations[0], "cache_build_s": cache_s, "peak_rss_bytes": maxrss,
        "lora_modules": sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A")),
        "trainable_parameters": sum(p.numel() for p in params), "final_loss": loss.item(),
    }
