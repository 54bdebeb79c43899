"""Pre-flight estimate of time per step and GPU memory, from counted FLOPs, the cost model and a calibration.

FLOPs are counted exactly by running the UNet's forward on the meta device (no weights, no memory) under
torch's FLOP counter; a LoRA step costs ~2.1 forwards (+34 % with gradient checkpointing), as measured for
SD1.5 and SDXL (shared/FACTS.md, "Cost model"). The device's throughput comes from a short matmul calibration,
discounted by the fraction of peak that diffusion training actually reaches.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.config import BUILTIN_DEMO_MODEL, Job
from studio.engine.devices import format_bytes, pick_device
from studio.paths import resource_path

STEP_OVER_FORWARD = 2.1
CHECKPOINTING_OVERHEAD = 1.34
# Fraction of the calibrated matmul peak a UNet step reaches (convolutions, norms, launches): measured
# figures in benchmarks/RESULTS.md; peers reach at most ~0.25 on GPUs.
ACHIEVED_FRACTION = {"cuda": 0.30, "mps": 0.20, "cpu": 0.35}
# Activation memory kept for backward per image at the family's native resolution (bf16), GiB.
ACTIVATION_GIB = {"sd1": (0.84, 0.14), "sd2": (1.9, 0.32), "sdxl": (6.0, 0.45)}
CONTEXT_OVERHEAD = 0.6 * 2**30  # CUDA context, allocator slack


@dataclass
class Estimate:
    seconds_per_step: float
    total_seconds: float
    step_tflop: float
    device: str
    gpu_memory_bytes: int | None = None
    gpu_total_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        parts = [f"≈ {format_duration(self.seconds_per_step)} per step, {format_duration(self.total_seconds)} in total "
                 f"on {self.device} ({self.step_tflop:.2f} TFLOP per step)"]
        if self.gpu_memory_bytes is not None:
            parts.append(f"GPU memory ≈ {format_bytes(self.gpu_memory_bytes)}"
                         + (f" of {format_bytes(self.gpu_total_bytes)}" if self.gpu_total_bytes else ""))
        return "; ".join(parts) + "".join(f"\nwarning: {w}" for w in self.warnings)


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _config_folder(job: Job, family: str) -> Path:
    """The diffusers config folder describing the job's model: its own, or the bundled one for the family."""
    path = job.model.path
    if path == BUILTIN_DEMO_MODEL:
        from studio.engine.checkpoint import demo_model_path

        return demo_model_path()
    folder = Path(path).expanduser()
    if (folder / "unet" / "config.json").is_file():
        return folder
    if job.model.config_dir:
        return Path(job.model.config_dir).expanduser()
    return resource_path("model_configs", {"sd2": "sd2-v" if job.model.prediction_type != "epsilon" else "sd2"}.get(family, family))


def _vae_factor(folder: Path) -> int:
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError):
        return 8


def guess_family(job: Job) -> str:
    if job.model.family != "auto":
        return job.model.family
    if job.model.path == BUILTIN_DEMO_MODEL:
        return "sd1"
    try:
        from studio.engine.checkpoint import inspect_path

        return inspect_path(job.model.path).get("family") or "sd1"
    except Exception:  # an estimate must never fail the form it is shown on
        return "sd1"


@functools.lru_cache(maxsize=16)
def unet_forward_flops(config_json: str, width: int, height: int, batch: int, down: int = 8) -> int:
    """Exact FLOPs of one UNet forward at this pixel size (``down`` = the VAE's factor), counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x = torch.empty(batch, config["in_channels"], height // down, width // down)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, config["cross_attention_dim"])
        added = None
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
    with FlopCounterMode(display=False) as counter:
        unet(x, t, ctx, added_cond_kwargs=added)
    return counter.get_total_flops()


@functools.lru_cache(maxsize=4)
def calibrate_tflops(device_type: str) -> float:
    """Measured dense-matmul throughput of the device, TFLOP/s (≈0.2 s, cached per process)."""
    device = torch.device(device_type)
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    n = 1024 if device_type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.2:
        c = a @ b
        reps += 1
    c.sum().item()
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e12


def lora_param_count(config: dict, rank: int) -> int:
    """Rough LoRA parameter count of the UNet (kohya-default targets): rank × (in + out) per module."""
    widths = config["block_out_channels"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, int) else max(depth)
    ctx = config["cross_attention_dim"]
    per_block = sum(rank * (2 * w + (ctx + w) * 2 + 2 * w + w * 8 + 4 * w + 2 * w) for w in widths)
    return per_block * depth * (config.get("layers_per_block", 2) * 2 + 1)


def estimate(job: Job, *, device: str | None = None, calibrate: bool = True) -> Estimate:
    t, d = job.training, job.dataset
    family = guess_family(job)
    folder = _config_folder(job, family)
    config = json.loads((folder / "unet" / "config.json").read_text())
    dev = pick_device(device or t.device)
    fwd = unet_forward_flops(json.dumps(config, sort_keys=True), d.resolution, d.resolution, t.batch_size,
                             _vae_factor(folder))
    step_flops = fwd * STEP_OVER_FORWARD * (CHECKPOINTING_OVERHEAD if t.gradient_checkpointing else 1.0)
    step_flops *= t.gradient_accumulation
    if not t.cache_latents:
        step_flops *= 1.65  # the VAE encode is ~65 % of an SD1.5 step (FACTS.md)
    peak = calibrate_tflops(dev.type) if calibrate else {"cpu": 0.3, "cuda": 300.0, "mps": 10.0}[dev.type]
    per_step = step_flops / (peak * 1e12 * ACHIEVED_FRACTION[dev.type])
    total_steps = t.steps if t.epochs == 0 else t.epochs * 100  # epochs need the dataset; assume ~100 steps each
    warnings: list[str] = []
    gpu_bytes = gpu_total = None
    if dev.type == "cuda":
        gpu_bytes = _gpu_memory(job, family, config)
        gpu_total = torch.cuda.get_device_properties(dev).total_memory
        if gpu_bytes > gpu_total:
            warnings.append(f"this will likely not fit in {format_bytes(gpu_total)} of GPU memory: turn on gradient "
                            "checkpointing, lower the batch size or the resolution")
    if dev.type == "cpu" and total_steps * per_step > 3600:
        warnings.append("training on the CPU will take hours; a GPU is 50–200× faster")
    return Estimate(per_step, per_step * total_steps, step_flops / 1e12, dev.type.upper() if dev.type != "cuda" else
                    torch.cuda.get_device_name(dev), gpu_bytes, gpu_total, warnings)


def _gpu_memory(job: Job, family: str, config: dict) -> int:
    t, d = job.training, job.dataset
    unet_params = {"sd1": 859.5e6, "sd2": 865.9e6, "sdxl": 2567.5e6}.get(family, 859.5e6)
    te_params = {"sd1": 123.1e6, "sd2": 340.4e6, "sdxl": 123.1e6 + 694.7e6}.get(family, 123.1e6)
    weight_bytes = 4 if t.mixed_precision == "no" else 2
    native = {"sd1": 512, "sd2": 768, "sdxl": 1024}.get(family, 512)
    per_img = ACTIVATION_GIB.get(family, ACTIVATION_GIB["sd1"])[1 if t.gradient_checkpointing else 0] * 2**30
    activations = per_img * t.batch_size * (d.resolution / native) ** 2
    lora = lora_param_count(config, job.lora.rank) * 16  # fp32 weight + grad + two Adam moments
    te_resident = 0 if (t.cache_text_embeddings and not job.lora.train_text_encoder) else te_params * weight_bytes
    vae = 83.7e6 * 4
    return int(unet_params * weight_bytes + te_resident + vae + lora + activations + CONTEXT_OVERHEAD)
