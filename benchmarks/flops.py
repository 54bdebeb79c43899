"""FLOPs and op counts of one training step, counted with torch's FLOP counter on the meta device; device peak.

Counting on the meta device needs no weights and no memory, and it sees the math the step does: on a real CPU
the counter misses fused attention kernels (``_scaled_dot_product_flash_attention_for_cpu`` has no formula),
on meta SDPA decomposes into the matmuls it stands for.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class _OpCounter(TorchDispatchMode):
    """Counts aten ops: in eager mode each is at least one kernel launch (GPU) or dispatch (CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _counted(fn) -> tuple[int, int]:
    with FlopCounterMode(display=False) as flops, _OpCounter() as ops:
        fn()
    return flops.get_total_flops(), ops.ops


def count_step(model_dir: Path, job: Any) -> dict[str, Any]:
    """FLOPs and ops of one optimizer step of ``job`` on the model in ``model_dir``, at square ``resolution``.

    The UNet part is a real LoRA forward + backward (peft adapters, the job's targets and rank, gradient
    checkpointing when on, so its recomputation is counted). VAE encoding and text encoding are added when the
    job does them every step (caching off).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.engine.families import family_of_folder
    from studio.engine.lora import lora_config

    model_dir = Path(model_dir)
    t, d = job.training, job.dataset
    batch = t.batch_size
    family = family_of_folder(model_dir)
    unet_cfg = family.denoiser_config(model_dir)
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    h = w = d.resolution // down
    out: dict[str, Any] = {}
    with torch.device("meta"):
        unet = family.meta_denoiser(unet_cfg)
        encoders = [d_ for d_ in family.text_encoder_names if (model_dir / d_).is_dir()]
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(job.lora, family, family.denoiser_name, unet))
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        args, kwargs = family.denoiser_example_inputs(unet_cfg, batch, h, w)
    holder: dict[str, torch.Tensor] = {}

    def forward() -> None:
        holder["pred"] = unet(*args, **kwargs).sample

    def backward() -> None:
        holder.pop("pred").float().pow(2).mean().backward()

    fwd_flops, fwd_ops = _counted(forward)
    bwd_flops, bwd_ops = _counted(backward)
    out["unet_forward_flops"] = fwd_flops
    out["unet_step_flops"] = fwd_flops + bwd_flops
    out["step_over_forward"] = (fwd_flops + bwd_flops) / fwd_flops
    ops = fwd_ops + bwd_ops
    del unet

    vae_flops = text_flops = 0
    if not t.cache_latents:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(vae_cfg)
            pixels = torch.empty(batch, 3, d.resolution, d.resolution)
        vae_flops, vae_ops = _counted(lambda: vae.encode(pixels))
        ops += vae_ops
    text_cached = t.cache_text_embeddings and not job.lora.train_text_encoder and not d.shuffle_tags
    if not text_cached:
        for name in encoders:
            cfg = CLIPTextConfig.from_pretrained(model_dir / name)
            with torch.device("meta"):
                te = (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(cfg)
                ids = torch.zeros(batch, 77, dtype=torch.long)
            f, o = _counted(lambda: te(ids))
            text_flops += f
            ops += o
    out["vae_encode_flops"] = vae_flops
    out["text_encode_flops"] = text_flops
    out["step_flops"] = (out["unet_step_flops"] + vae_flops + text_flops) * t.gradient_accumulation
    out["ops_per_step"] = ops * t.gradient_accumulation
    return out


def calibrate_peak_tflops(device: torch.device | str, dtype: torch.dtype, *, seconds: float = 1.0, trials: int = 3) -> float:
    """Dense-matmul throughput in ``dtype``, TFLOP/s: the median of a few timed trials (a shared machine is noisy).

    This is the "peak" utilisation is measured against: what the device actually does on the best-case kernel,
    not a datasheet number.
    """
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    (a @ b).sum().item()
    results = []
    for _ in range(trials):
        sync()
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / trials:
            a @ b
            reps += 1
        sync()
        results.append(2 * n**3 * reps / (time.perf_counter() - started) / 1e12)
    return statistics.median(results)
