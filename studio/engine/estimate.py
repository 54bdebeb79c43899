"""Pre-flight estimate of time per step and GPU memory, from counted FLOPs, the cost model and a calibration.

FLOPs are counted exactly by running the family's denoiser forward on the meta device (no weights, no memory)
under torch's FLOP counter (the family builds it and its inputs); a LoRA step costs ~2.1 forwards (+34 % with
gradient checkpointing), as counted for SD1.5 and SDXL (shared/FACTS.md, "Cost model"; benchmarks/RESULTS.md
re-counts it for every benchmark run). Without caches the VAE encoder and the text encoders are counted too.
LoRA adapters add ~1 % to the FLOPs and are left out; their parameter count (for memory) is exact.
The device's throughput comes from a short matmul calibration, discounted by the fraction of it that a denoiser
step was measured to reach (benchmarks/RESULTS.md). On GPUs a step also cannot be faster than launching its
kernels one by one (eager PyTorch at small batches is launch-bound), so the op count sets a floor.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from studio.engine.config import BUILTIN_DEMO_MODEL, Job
from studio.engine.devices import device_problem, format_bytes, pick_device
from studio.engine.families import DEFAULT_FAMILY, Family, get_family
from studio.engine.jsonfile import JsonFileError, read_json_object

# Counted on the meta device with the FLOP counter: a LoRA step (kohya-default targets, forward + backward)
# over a plain forward is 2.17 on SD1.5 at 512 px and 2.12 on SDXL at 1024 px; gradient checkpointing
# recomputes the forward during backward: 1.37x on SD1.5 (FACTS.md: 2.1 and +34 %).
STEP_OVER_FORWARD = 2.15
CHECKPOINTING_OVERHEAD = 1.34
# Aten ops of that LoRA step over those of a plain forward: SD1.5 9.4 k / 2.1 k = 4.4, SDXL 36.6 k / 7.6 k = 4.8
# (peft adds ~5 ops per adapted module to the forward; backward roughly doubles the rest).
OPS_STEP_OVER_FORWARD = 4.6
# Fraction of the calibrated matmul peak a LoRA training step reaches at batch 1 (convolutions, norms,
# attention, launches). cpu: measured 0.44-0.52 on the benchmark's small SD-architecture model, fp32, default
# OpenMP settings (benchmarks/RESULTS.md, "The estimate"). cuda/mps: not measured yet (no GPU was available);
# peers reach at most ~0.25 of peak on GPUs (FACTS.md).
ACHIEVED_FRACTION = {"cuda": 0.25, "mps": 0.20, "cpu": 0.48}
# Bigger batches keep the cores busier: on the CPU batch 4 reached 0.72 of peak against 0.50 at batch 1, i.e.
# the fraction grows like batch**0.25 there (capped at batch 8). On GPUs the op-count floor below already
# models why small batches are slow, so their fraction does not grow.
BATCH_EXPONENT = {"cpu": 0.25}
# The frozen encoders run forward only in large dense kernels (no backward, no LoRA): the VAE and CLIP
# encoding of uncached steps reached 0.79 of peak on the CPU. GPU figures are guesses until measured (the VAE
# runs in fp32 there, against a bf16 calibration).
ENCODER_FRACTION = {"cuda": 0.30, "mps": 0.20, "cpu": 0.80}
# Host-side cost of one eager op (dispatch + kernel launch), seconds: the floor of a launch-bound step.
# Typical eager PyTorch figures; uncalibrated until a GPU benchmark runs.
OP_OVERHEAD_S = {"cuda": 10e-6, "mps": 20e-6, "cpu": 0.0}
# Activation memory per image and the reference parameter counts are the family's (Family.activation_gib,
# Family.full_size_parameters: FACTS.md "Cost model").
CONTEXT_OVERHEAD = 0.6 * 2**30  # CUDA context and kernels
ALLOCATOR_SLACK = 1.10  # the caching allocator reserves more than is allocated (fragmentation)
TIGHT = 0.90  # above this share of the card, warn that the run may not fit


@dataclass
class Estimate:
    seconds_per_step: float
    total_seconds: float
    step_tflop: float
    device: str
    gpu_memory_bytes: int | None = None
    gpu_total_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    peak_tflops: float = 0.0  # the calibrated matmul throughput the estimate used
    total_steps: int = 0
    launch_bound: bool = False  # the op-count floor, not the FLOPs, set the step time

    @property
    def summary(self) -> str:
        parts = [f"≈ {format_duration(self.seconds_per_step)} per step, {format_duration(self.total_seconds)} in total "
                 f"({self.total_steps} steps) on {self.device} ({self.step_tflop:.3g} TFLOP per step)"]
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


def _config_folder(job: Job, family: Family) -> Path:
    """The diffusers config folder describing the job's model: its own, or the bundled one for the family."""
    path = job.model.path
    if path == BUILTIN_DEMO_MODEL:
        from studio.engine.checkpoint import demo_model_path

        return demo_model_path()
    folder = Path(path).expanduser()
    if (folder / family.denoiser_name / "config.json").is_file():
        return folder
    if job.model.config_dir:
        return Path(job.model.config_dir).expanduser()
    return family.bundled_config_dir(None if job.model.prediction_type == "auto" else job.model.prediction_type)


def _read_json(path: Path) -> dict | None:
    try:
        return read_json_object(path)
    except JsonFileError:
        return None


def _vae_factor(vae: dict | None) -> int:
    try:
        return 2 ** (len(vae["block_out_channels"]) - 1)  # type: ignore[index]
    except (TypeError, KeyError):
        return 8


def guess_family(job: Job) -> str:
    """The job's family: set, or told by the model file/folder (the default family when nothing tells)."""
    if job.model.family != "auto":
        return job.model.family
    if job.model.path == BUILTIN_DEMO_MODEL:
        return DEFAULT_FAMILY
    try:
        from studio.engine.inspection import inspect_path

        return inspect_path(job.model.path).get("family") or DEFAULT_FAMILY
    except Exception:  # an estimate must never fail the form it is shown on
        return DEFAULT_FAMILY


class _OpCounter(TorchDispatchMode):
    """Counts aten ops (in eager mode each is at least one kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=4)
def _meta_denoiser(family: str, config_json: str):
    """The family's denoiser of this config on the meta device: shapes only, no memory; built once, never mutated."""
    with torch.device("meta"):
        return get_family(family).meta_denoiser(json.loads(config_json))


@functools.lru_cache(maxsize=16)
def denoiser_cost(family: str, config_json: str, width: int, height: int, batch: int = 1, down: int = 8) -> tuple[int, int]:
    """(FLOPs, aten ops) of one denoiser forward at this pixel size (``down`` = the VAE's factor), on the meta device.

    Counted at batch 1 and scaled: every denoiser op works per sample, so FLOPs grow exactly with the batch and
    the op count does not grow at all (which is why small batches are launch-bound).
    """
    if batch != 1:
        flops, ops = denoiser_cost(family, config_json, width, height, 1, down)
        return flops * batch, ops
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    denoiser = _meta_denoiser(family, config_json)
    with torch.device("meta"):
        args, kwargs = get_family(family).denoiser_example_inputs(config, 1, height // down, width // down)
    counter = _OpCounter()
    with FlopCounterMode(display=False) as flops, counter, torch.no_grad():
        denoiser(*args, **kwargs)
    return flops.get_total_flops(), counter.ops


@functools.lru_cache(maxsize=16)
def lora_param_count(family: str, config_json: str, targets: str, rank: int, conv_rank: int = 0) -> int:
    """Exact LoRA parameter count of the denoiser for these targets and ranks, from the modules peft would wrap.

    peft's adapters: Linear in→out gets A (rank×in) and B (out×rank); a k×k Conv2d gets A (rank×in×k×k) and a
    1×1 B (out×rank), with the conv rank for spatial convolutions (kohya's conv_dim).
    """
    from studio.engine.lora import matching_modules, target_modules

    denoiser = _meta_denoiser(family, config_json)
    modules = dict(denoiser.named_modules())
    total = 0
    for name in matching_modules(denoiser, target_modules(family, targets, get_family(family).denoiser_name)):
        module = modules[name]
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        else:
            spatial = tuple(module.kernel_size) != (1, 1)  # 1x1 convs are linear maps: normal rank (kohya)
            r = (conv_rank or rank) if spatial else rank
            kh, kw = module.kernel_size
            total += r * module.in_channels * kh * kw + r * module.out_channels
    return total


@functools.lru_cache(maxsize=8)
def vae_encode_flops(config_json: str, width: int, height: int, batch: int = 1) -> int:
    """FLOPs of VAE-encoding ``batch`` images (what every step pays when latents are not cached)."""
    if batch != 1:
        return vae_encode_flops(config_json, width, height, 1) * batch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads(config_json))
        pixels = torch.empty(batch, 3, height, width)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        vae.encode(pixels)
    return flops.get_total_flops()


@functools.lru_cache(maxsize=8)
def calibrate_tflops(device_type: str, dtype: torch.dtype | None = None, seconds: float = 0.3) -> float:
    """Measured dense-matmul throughput of the device in ``dtype``, TFLOP/s (cached per process).

    The median of three short trials: a CPU shared with other work gives noisy single readings.
    """
    device = torch.device(device_type)
    dtype = dtype or (torch.float32 if device_type == "cpu" else torch.bfloat16)
    n = 1024 if device_type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up (and the kernels' one-time setup)
    trials = []
    for _ in range(3):
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            c = a @ b
            reps += 1
        c.sum().item()  # waits for a GPU to finish what was queued
        trials.append(2 * n**3 * reps / (time.perf_counter() - started) / 1e12)
    return statistics.median(trials)


def planned_steps(job: Job) -> int:
    """Steps the run will take: ``training.steps``, or for epochs the dataset's images × repeats per batch."""
    t, d = job.training, job.dataset
    if t.epochs == 0:
        return t.steps
    images = _count_images(d.path, d.repeats, d.default_repeats)
    per_epoch = max(1, math.ceil(images / t.batch_size) // t.gradient_accumulation) if images else 100
    return t.epochs * per_epoch


def _count_images(path: str, repeats: dict, default_repeats: int) -> int:
    """Images × repeats under the dataset folder, from the file names alone (no decoding), 0 if unreadable."""
    from studio.engine.dataset import folder_repeats
    from studio.engine.images import IMAGE_EXTENSIONS

    root = Path(path).expanduser() if path else None
    if root is None or not root.is_dir():
        return 0
    total = 0
    try:
        for file in root.rglob("*"):
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                rel = file.parent.relative_to(root).as_posix()
                total += folder_repeats("" if rel == "." else rel, repeats, default_repeats)[0]
    except OSError:
        return total
    return total


def _compute_dtype(job: Job, device_type: str) -> torch.dtype | None:
    mixed = job.training.mixed_precision
    if device_type == "cpu":
        # Always fp32 on the CPU: bf16 matmuls calibrate 4.5x faster there, yet bf16 autocast made a training
        # step only 4 % faster (benchmarks/RESULTS.md); the step is bound by convolutions, norms and memory.
        return torch.float32
    return {"fp16": torch.float16, "no": torch.float32}.get(mixed, torch.bfloat16)


def estimate(job: Job, *, device: str | None = None, calibrate: bool = True) -> Estimate:
    t, d = job.training, job.dataset
    family = get_family(guess_family(job))
    folder = _config_folder(job, family)
    # Raises JsonFileError naming the file (missing, damaged, not an object).
    config = read_json_object(folder / family.denoiser_name / "config.json", what=f"the {family.denoiser_name} configuration")
    vae_config = _read_json(folder / "vae" / "config.json")
    warnings: list[str] = []
    requested = device or t.device
    problem = device_problem(requested)
    if problem:  # estimate what would actually happen, and say why
        warnings.append(problem)
        requested = "cpu"
    dev = pick_device(requested)
    down = _vae_factor(vae_config)
    config_json = json.dumps(config, sort_keys=True)
    fwd, fwd_ops = denoiser_cost(family.name, config_json, d.resolution, d.resolution, t.batch_size, down)
    denoiser_flops = fwd * STEP_OVER_FORWARD * (CHECKPOINTING_OVERHEAD if t.gradient_checkpointing else 1.0)
    step_ops = fwd_ops * OPS_STEP_OVER_FORWARD * t.gradient_accumulation
    encode_flops = 0
    if not t.cache_latents and vae_config:
        encode_flops += vae_encode_flops(json.dumps(vae_config, sort_keys=True), d.resolution, d.resolution, t.batch_size)
    if not _text_cached(job):
        encode_flops += family.text_encoder_flops(folder, t.batch_size)
    denoiser_flops *= t.gradient_accumulation
    encode_flops *= t.gradient_accumulation
    step_flops = denoiser_flops + encode_flops
    fallback = {"cpu": 0.05, "cuda": 300.0, "mps": 10.0}
    peak = calibrate_tflops(dev.type, _compute_dtype(job, dev.type)) if calibrate else fallback.get(dev.type, 0.05)
    fraction = ACHIEVED_FRACTION.get(dev.type, 0.2) * min(t.batch_size, 8) ** BATCH_EXPONENT.get(dev.type, 0.0)
    compute_s = (denoiser_flops / fraction + encode_flops / ENCODER_FRACTION.get(dev.type, 0.2)) / (peak * 1e12)
    launch_s = step_ops * OP_OVERHEAD_S.get(dev.type, 0.0)
    per_step = max(compute_s, launch_s)
    total_steps = planned_steps(job)
    gpu_bytes = gpu_total = None
    name = dev.type.upper()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = props.name
        gpu_total = props.total_memory
        lora_params = lora_param_count(family.name, config_json, job.lora.targets, job.lora.rank, job.lora.conv_rank)
        gpu_bytes = gpu_memory(job, family, lora_params)
        if gpu_bytes > gpu_total:
            warnings.append(f"this will likely not fit in the {format_bytes(gpu_total)} of GPU memory (needs ≈ "
                            f"{format_bytes(gpu_bytes)}): {_memory_advice(job)}")
        elif gpu_bytes > TIGHT * gpu_total:
            warnings.append(f"this needs ≈ {format_bytes(gpu_bytes)} of the {format_bytes(gpu_total)} of GPU memory "
                            f"and may not fit: {_memory_advice(job)}")
    if dev.type == "cpu" and total_steps * per_step > 3600:
        warnings.append("training on the CPU will take hours; a GPU is 50–200× faster")
    return Estimate(per_step, per_step * total_steps, step_flops / 1e12, name, gpu_bytes, gpu_total, warnings, peak,
                    total_steps, launch_s > compute_s)


def _text_cached(job: Job) -> bool:
    """Whether the trainer encodes captions once (as it does only for a frozen encoder and fixed captions)."""
    return job.training.cache_text_embeddings and not job.lora.train_text_encoder and not job.dataset.shuffle_tags


def _memory_advice(job: Job) -> str:
    t = job.training
    steps = []
    if not t.gradient_checkpointing:
        steps.append("turn on gradient checkpointing")
    if t.batch_size > 1:
        steps.append("lower the batch size (raise gradient accumulation to keep the effective batch)")
    if t.mixed_precision == "no":
        steps.append("use mixed precision")
    steps.append("or lower the resolution")
    return ", ".join(steps)


def gpu_memory(job: Job, family: Family | str, lora_params: int) -> int:
    """Peak GPU memory of training, bytes: weights + optimizer state + activations kept for backward + overheads."""
    t, d = job.training, job.dataset
    family = get_family(family)
    sizes = family.full_size_parameters()
    te_params = sizes["text_encoders"]
    weight_bytes = 4 if t.mixed_precision == "no" else 2
    native = family.native_resolution(None)
    per_img = family.activation_gib(t.gradient_checkpointing) * 2**30
    per_img *= weight_bytes / 2  # the table is for bf16 activations; fp32 keeps twice as much
    activations = per_img * t.batch_size * (d.resolution / native) ** 2
    lora = lora_params * 16  # fp32 weight + grad + two Adam moments
    if job.lora.train_text_encoder:
        lora += te_params * 0.01 * 16  # text-encoder adapters: ~1 % of its weights at usual ranks
    # Frozen text encoders with fixed captions are encoded once, then moved off the GPU until previews.
    te_resident = 0 if _text_cached(job) else te_params * weight_bytes
    vae = sizes["vae"] * 4  # the VAE stays in fp32 (SDXL's overflows in fp16)
    # The family says what its frozen weights cost on the GPU (fp8 storage, block swap: Flux).
    denoiser = family.denoiser_weight_bytes(t, weight_bytes)
    return int((denoiser + te_resident + vae + lora + activations) * ALLOCATOR_SLACK + CONTEXT_OVERHEAD)
