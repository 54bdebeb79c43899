"""Pre-flight estimate of time per step and GPU memory, from counted FLOPs, the cost model and a calibration.

FLOPs are counted exactly by running the family's denoiser forward on the meta device (no weights, no memory)
under torch's FLOP counter (the family builds it and its inputs); a LoRA step costs ~2.1 forwards (+34 % with
gradient checkpointing), as counted for SD1.5 and SDXL (shared/FACTS.md, "Cost model"; benchmarks/RESULTS.md
re-counts it for every benchmark run). Without caches the VAE encoder and the text encoders are counted too.
LoRA adapters add ~1 % to the FLOPs and are left out; their parameter count (for memory) is exact.
The device's throughput comes from a short matmul calibration, discounted by the fraction of it that a denoiser
step was measured to reach (benchmarks/RESULTS.md). On GPUs a step also cannot be faster than launching its
kernels one by one (eager PyTorch at small batches is launch-bound), so the op count sets a floor; on a CPU the
same per-op cost adds to the compute (one core does both). Previews (prompts × sampler steps × CFG at the preview
cadence) are costed from the same counts and added to the total.

How good it is: the CPU constants were fitted on two measured configurations and checked on held-out ones (other
resolutions, batches, ranks, targets, caching, checkpointing); ``HELD_OUT_ERROR`` is that check's error band
(benchmarks/RESULTS.md, "The estimate, held out"; ``python -m benchmarks.run --suite estimate``). GPU constants
are not measured yet: a GPU estimate says it is uncalibrated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from studio.engine.config import BUILTIN_DEMO_MODEL, Job, LoraSection
from studio.engine.devices import device_problem, format_bytes, pick_device
from studio.engine.families import DEFAULT_FAMILY, Family, get_family
from studio.engine.jsonfile import JsonFileError, read_json_object

# Counted on the meta device with the FLOP counter: a LoRA step (kohya-default targets, forward + backward)
# over a plain forward is 2.17 on SD1.5 at 512 px and 2.12 on SDXL at 1024 px; gradient checkpointing
# recomputes the forward during backward: 1.37x on SD1.5 (FACTS.md: 2.1 and +34 %).
STEP_OVER_FORWARD = 2.15
CHECKPOINTING_OVERHEAD = 1.34
# Aten ops of a LoRA step: ~2.8 per op of a plain forward plus ~16 per adapted module (peft's wrapper adds a few
# ops to the forward, backward roughly doubles them); checkpointing replays the forward: +1.4 per forward op and
# +10 per module. Counted on the meta device for the benchmark's small and tiny SD models with the attention,
# kohya-default and +conv targets (within 4 %), SD1.5 (192 modules: 9.0 k vs 9.4 k counted, FACTS.md) and SDXL
# (33 k vs 36.6 k).
OPS_STEP_OVER_FORWARD = 2.8
OPS_PER_LORA_MODULE = 16.0
OPS_CHECKPOINTING = (1.4, 10.0)
# Fraction of the calibrated matmul peak a LoRA training step's FLOPs reach at batch 1 (convolutions, norms,
# attention, memory traffic). cpu: 0.37, solved together with OP_OVERHEAD_FLOPS["cpu"] from two measured runs (the
# benchmark's small model at 256 px and the tiny one at 64 px, batch 1, kohya-default rank 16, fp32;
# benchmarks/results/estimate-cpu.json, `python -m benchmarks.estimate_check` re-solves it) and checked on held-out
# ones (HELD_OUT_ERROR), on a quiet machine (load < 1.2) with OpenMP's default waiting, as the app runs; fitted under
# load 14-16 it was 0.52 (a busy CPU's short calibration catches a bigger share of the cores than its run then
# gets). cuda/mps: not measured yet (no GPU was
# available); peers reach at most ~0.25 of peak on GPUs (FACTS.md).
ACHIEVED_FRACTION = {"cuda": 0.25, "mps": 0.20, "cpu": 0.37}
# Bigger batches keep the cores busier: on the CPU batch 4 reached 0.72 of peak against 0.50 at batch 1, i.e.
# the fraction grows like batch**0.25 there (capped at batch 8). On GPUs the op-count floor below already
# models why small batches are slow, so their fraction does not grow.
BATCH_EXPONENT = {"cpu": 0.25}
# The frozen encoders run forward only in large dense kernels (no backward, no LoRA): the VAE and CLIP
# encoding of uncached steps reached 0.79 of peak on the CPU. GPU figures are guesses until measured (the VAE
# runs in fp32 there, against a bf16 calibration).
ENCODER_FRACTION = {"cuda": 0.30, "mps": 0.20, "cpu": 0.80}
# Host-side cost of one eager op (dispatch + kernel launch), seconds: typical eager PyTorch figures on GPUs,
# uncalibrated until a GPU benchmark runs.
OP_OVERHEAD_S = {"cuda": 10e-6, "mps": 20e-6}
# On a CPU the same cores run the Python and dispatcher work around each op and the math, so an op's overhead is
# counted in matmul FLOPs it could have done instead: it then scales with the calibrated throughput, as it does
# when the CPU is slower or shared with other work. Fitted with ACHIEVED_FRACTION["cpu"] (above): 3.7 MFLOP per op,
# i.e. ~12 µs at the ~0.3 TFLOP/s a quiet 2-core AVX-512 machine calibrates to.
OP_OVERHEAD_FLOPS = {"cpu": 3.7e6}
# Where the measured time fell relative to the estimate on the held-out configurations: measured / estimated - 1,
# (lowest, highest), by device type. Only the CPU is measured; elsewhere the estimate is labelled uncalibrated.
# cpu: the six held-out runs (benchmarks/results/estimate-cpu.json) fell between -16 % and +86 % (median 16 %; the
# +86 % is the tiny model at batch 4, where per-op overhead dominates), measured on a quiet 2-core machine (load
# < 1.2); rounded outward. On a machine shared with other work runs come out slower than this (a short calibration
# catches a bigger share of the CPU than the run then gets): under load 14-16 the check gave -3 % … +108 %.
HELD_OUT_ERROR: dict[str, tuple[float, float]] = {"cpu": (-0.20, 0.90)}
# Activation memory per image and the reference parameter counts are the family's (Family.activation_gib,
# Family.full_size_parameters: FACTS.md "Cost model").
CONTEXT_OVERHEAD = 0.6 * 2**30  # CUDA context and kernels
ALLOCATOR_SLACK = 1.10  # the caching allocator reserves more than is allocated (fragmentation)
TIGHT = 0.90  # above this share of the card, warn that the run may not fit


@dataclass
class Estimate:
    seconds_per_step: float  # training steps only; previews are in preview_seconds
    total_seconds: float  # every step plus every preview
    step_tflop: float
    device: str
    gpu_memory_bytes: int | None = None
    gpu_total_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    peak_tflops: float = 0.0  # the calibrated matmul throughput the estimate used
    total_steps: int = 0
    launch_bound: bool = False  # the op-count floor, not the FLOPs, set the step time
    previews: int = 0  # preview rounds the run will make (each renders every prompt)
    preview_seconds: float = 0.0  # all of them together
    # measured / estimated - 1 on held-out configurations, (low, high); None: not measured on this kind of device.
    error_band: tuple[float, float] | None = None
    memory: "MemoryPhases | None" = None  # GPU bytes per phase of the run (loading, training, previews); CUDA only

    @property
    def calibrated(self) -> bool:
        """Whether the estimate's constants were checked against measurements on this kind of device."""
        return self.error_band is not None

    def seconds_range(self, seconds: float) -> tuple[float, float] | None:
        """The range a measured time fell in on held-out configurations, for an estimate of ``seconds``."""
        if self.error_band is None:
            return None
        low, high = self.error_band
        return seconds * (1 + low), seconds * (1 + high)

    @property
    def accuracy(self) -> str:
        """For people: how far to trust the figures."""
        if self.error_band is None:
            return f"uncalibrated: the estimate has not been measured against real runs on a {self.device_kind} yet"
        low, high = self.error_band
        return f"measured runs fell within {100 * low:+.0f} % to {100 * high:+.0f} % of it on settings it was not fitted on"

    @property
    def device_kind(self) -> str:
        return "CPU" if self.device == "CPU" else "GPU"

    @property
    def summary(self) -> str:
        span = self.seconds_range(self.seconds_per_step)
        per_step = (f"{format_duration(span[0])}–{format_duration(span[1])}" if span
                    else f"≈ {format_duration(self.seconds_per_step)}")
        parts = [f"{per_step} per step, {format_duration(self.total_seconds)} in total "
                 f"({self.total_steps} steps) on {self.device} ({self.step_tflop:.3g} TFLOP per step)"]
        if self.previews:
            parts.append(f"previews ≈ {format_duration(self.preview_seconds)} of it ({self.previews} rounds)")
        if self.gpu_memory_bytes is not None:
            parts.append(f"GPU memory ≈ {format_bytes(self.gpu_memory_bytes)}"
                         + (f" of {format_bytes(self.gpu_total_bytes)}" if self.gpu_total_bytes else "")
                         + (f" ({self.memory.breakdown})" if self.memory else ""))
        return ("; ".join(parts) + f"\n({self.accuracy})"
                + "".join(f"\nwarning: {w}" for w in self.warnings))


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


def lora_param_count(family: str, config_json: str, lora: LoraSection) -> int:
    """Exact trainable parameter count of the job's adapter on the denoiser: the adapter type (LoRA, LoCon, DoRA,
    LoHa, LoKr), its targets and ranks, injected by peft into a meta-device denoiser (shapes only, no memory)."""
    return _adapter_params(family, config_json, json.dumps(dataclasses.asdict(lora), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _adapter_params(family: str, config_json: str, lora_json: str) -> int:
    from studio.engine.adapters import adapter_for
    from studio.engine.config import LoraSection

    lora = LoraSection(**json.loads(lora_json))
    fam = get_family(family)
    with torch.device("meta"):
        denoiser = fam.meta_denoiser(json.loads(config_json))  # a fresh one: injecting changes the module
    denoiser.requires_grad_(False)
    denoiser.add_adapter(adapter_for(lora).peft_config(lora, fam, fam.denoiser_name, denoiser))
    return sum(p.numel() for p in denoiser.parameters() if p.requires_grad)


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


def estimate(job: Job, *, device: str | None = None, calibrate: bool = True,
             peak_tflops: float | None = None) -> Estimate:
    """Time per step, total time (previews included) and GPU memory of ``job``, before it runs.

    ``peak_tflops``: the device's matmul throughput, when already measured (else calibrated now, or a typical
    figure with ``calibrate=False``).
    """
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
    modules = lora_module_count(family.name, config_json, job.lora.targets)
    denoiser_flops = fwd * STEP_OVER_FORWARD * (CHECKPOINTING_OVERHEAD if t.gradient_checkpointing else 1.0)
    step_ops = fwd_ops * OPS_STEP_OVER_FORWARD + modules * OPS_PER_LORA_MODULE
    if t.gradient_checkpointing:
        step_ops += fwd_ops * OPS_CHECKPOINTING[0] + modules * OPS_CHECKPOINTING[1]
    step_ops *= t.gradient_accumulation
    encode_flops = 0
    if not t.cache_latents and vae_config:
        encode_flops += vae_encode_flops(json.dumps(vae_config, sort_keys=True), d.resolution, d.resolution, t.batch_size)
    if not _text_cached(job):
        encode_flops += family.text_encoder_flops(folder, t.batch_size)
    denoiser_flops *= t.gradient_accumulation
    encode_flops *= t.gradient_accumulation
    step_flops = denoiser_flops + encode_flops
    peak = peak_tflops or (calibrate_tflops(dev.type, _compute_dtype(job, dev.type)) if calibrate
                           else FALLBACK_TFLOPS.get(dev.type, 0.05))
    fraction = ACHIEVED_FRACTION.get(dev.type, 0.2) * min(t.batch_size, 8) ** BATCH_EXPONENT.get(dev.type, 0.0)
    compute_s = (denoiser_flops / fraction + encode_flops / ENCODER_FRACTION.get(dev.type, 0.2)) / (peak * 1e12)
    launch_s = step_ops * op_seconds(dev.type, peak)
    per_step = _combine(dev.type, compute_s, launch_s)
    total_steps = planned_steps(job)
    previews = preview_rounds(job, total_steps, per_step)
    preview_each = preview_seconds(job, family, folder, config_json, vae_config, down, dev.type, peak) if previews else 0.0
    gpu_bytes = gpu_total = phases = None
    name = dev.type.upper()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = props.name
        gpu_total = props.total_memory
        lora_params = lora_param_count(family.name, config_json, job.lora)
        phases = memory_phases(job, family, lora_params)
        gpu_bytes, phase = phases.peak, phases.peak_phase
        if gpu_bytes > gpu_total:
            warnings.append(f"this will likely not fit in the {format_bytes(gpu_total)} of GPU memory (needs ≈ "
                            f"{format_bytes(gpu_bytes)} for {phase}): {_memory_advice(job, phase, family)}")
        elif gpu_bytes > TIGHT * gpu_total:
            warnings.append(f"this needs ≈ {format_bytes(gpu_bytes)} of the {format_bytes(gpu_total)} of GPU memory "
                            f"for {phase} and may not fit: {_memory_advice(job, phase, family)}")
    total = per_step * total_steps + preview_each * previews
    if dev.type == "cpu" and total > 3600:
        warnings.append("training on the CPU will take hours; a GPU is 50–200× faster")
    return Estimate(per_step, total, step_flops / 1e12, name, gpu_bytes, gpu_total, warnings, peak, total_steps,
                    launch_s > compute_s, previews, preview_each * previews, HELD_OUT_ERROR.get(dev.type), phases)


FALLBACK_TFLOPS = {"cpu": 0.05, "cuda": 300.0, "mps": 10.0}  # typical throughputs, when not calibrating


def op_seconds(device_type: str, peak_tflops: float) -> float:
    """Seconds of host-side overhead per eager op on this device (see OP_OVERHEAD_S / OP_OVERHEAD_FLOPS)."""
    if device_type in OP_OVERHEAD_FLOPS:
        return OP_OVERHEAD_FLOPS[device_type] / (peak_tflops * 1e12)
    return OP_OVERHEAD_S.get(device_type, 0.0)


def _combine(device_type: str, compute_s: float, launch_s: float) -> float:
    """A GPU runs kernels while the host launches the next ones (the slower of the two sets the pace); a CPU does
    both on the same cores, one after the other."""
    return compute_s + launch_s if device_type == "cpu" else max(compute_s, launch_s)


@functools.lru_cache(maxsize=16)
def lora_module_count(family: str, config_json: str, targets: str) -> int:
    """How many denoiser modules the targets preset adapts (each adds a few ops to every step)."""
    from studio.engine.lora import matching_modules, target_modules

    return len(matching_modules(_meta_denoiser(family, config_json),
                                target_modules(family, targets, get_family(family).denoiser_name)))


def preview_rounds(job: Job, total_steps: int, seconds_per_step: float | None = None) -> int:
    """How many times the run renders its previews: at step 0 (the base model), every ``sampling.every`` steps,
    and at the last step when the cadence does not land on it (the trainer's cadence). 'auto' (-1) is the cadence
    the run will pick from this time per step (run_setup.preview_cadence)."""
    from studio.engine.sampling import auto_preview_cadence

    every = job.sampling.every
    if every < 0:
        every = auto_preview_cadence(seconds_per_step)
    if not every or total_steps <= 0:
        return 0
    return 1 + total_steps // every + (1 if total_steps % every else 0)


def _preview_prompt_count(job: Job) -> int:
    prompts = [p for p in job.sampling.prompts if str(p).strip()]
    return len(prompts) if prompts else 2  # the dataset's first two distinct captions (sampling.preview_prompts)


def preview_seconds(job: Job, family: Family, folder: Path, config_json: str, vae_config: dict | None, down: int,
                    device_type: str, peak: float) -> float:
    """One round of previews: per prompt, ``sampling.steps`` denoiser forwards (a doubled batch under
    classifier-free guidance), the prompt's text encoding and one VAE decode."""
    s, d = job.sampling, job.dataset
    width, height = s.width or d.resolution, s.height or d.resolution
    cfg = family.preview_batch_factor(s.guidance)
    fwd, fwd_ops = denoiser_cost(family.name, config_json, width, height, cfg, down)
    flops = fwd * s.steps
    ops = fwd_ops * s.steps
    encode = family.text_encoder_flops(folder, cfg)
    if vae_config:
        encode += vae_decode_flops(json.dumps(vae_config, sort_keys=True), width, height)
    fraction = ACHIEVED_FRACTION.get(device_type, 0.2) * cfg ** BATCH_EXPONENT.get(device_type, 0.0)
    compute = (flops / fraction + encode / ENCODER_FRACTION.get(device_type, 0.2)) / (peak * 1e12)
    return _preview_prompt_count(job) * _combine(device_type, compute, ops * op_seconds(device_type, peak))


@functools.lru_cache(maxsize=8)
def vae_decode_flops(config_json: str, width: int, height: int) -> int:
    """FLOPs of decoding one image's latents (every preview image pays it once)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    down = _vae_factor(config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        latents = torch.empty(1, config.get("latent_channels", 4), height // down, width // down)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        vae.decode(latents)
    return flops.get_total_flops()


def _text_cached(job: Job) -> bool:
    """Whether the trainer encodes captions once (as it does only for a frozen encoder and fixed captions)."""
    return job.training.cache_text_embeddings and not job.lora.train_text_encoder and not job.dataset.shuffle_tags


def _memory_advice(job: Job, phase: str = "training", family: Family | None = None) -> str:
    t = job.training
    steps = []
    if phase == "previews":
        steps.append("turn previews off (sampling.every = 0) or lower their size (sampling.width/height)")
    if phase == "loading":
        steps.append("cache the text embeddings (the text encoders then leave the GPU before the model arrives)")
    if not t.gradient_checkpointing:
        steps.append("turn on gradient checkpointing")
    if t.batch_size > 1:
        steps.append("lower the batch size (raise gradient accumulation to keep the effective batch)")
    if t.mixed_precision == "no":
        steps.append("use mixed precision")
    if family is not None and phase != "loading" and not t.base_weights_fp8:
        fp8 = dataclasses.replace(t, base_weights_fp8=True)
        if family.denoiser_weight_bytes(fp8, 2) < family.denoiser_weight_bytes(t, 2):  # the family can store fp8
            steps.append("store the base weights in fp8 (training.base_weights_fp8)")
    steps.append("or lower the resolution")
    return ", ".join(steps)


@dataclass(frozen=True)
class MemoryPhases:
    """Peak GPU bytes of each phase of a run; the run needs the largest."""

    loading: int  # the text encoders and the VAE caching; the denoiser arrives after, as stored (fp8: 1 B/weight)
    training: int  # weights, LoRA + gradients + optimizer state, activations kept for backward
    previews: int  # training's weights (+ the text encoders, where the family needs them back) (0: no previews)

    @property
    def peak(self) -> int:
        return max(self.loading, self.training, self.previews)

    @property
    def peak_phase(self) -> str:
        return max(("loading", "training", "previews"), key=lambda name: getattr(self, name))

    @property
    def breakdown(self) -> str:
        """For people: "loading 7.6 GB, training 10.3 GB, previews 18.2 GB" (previews left out when off)."""
        return ", ".join(f"{name} {format_bytes(getattr(self, name))}" for name in ("loading", "training", "previews")
                         if getattr(self, name))


def memory_phases(job: Job, family: Family | str, lora_params: int) -> MemoryPhases:
    """GPU memory of loading, training and previews, bytes. The run loads the denoiser into host memory, adds the LoRA
    and stores the frozen weights as the job asks (fp8) there, and only then moves it to the GPU (swapped blocks
    stay on the host): loading needs the text encoders and the VAE, never a full-precision denoiser."""
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
    te_all = family.text_encoder_weight_bytes(t, weight_bytes)  # fp8 T5 with base_weights_fp8 (Flux, SD3)
    # Frozen text encoders with fixed captions are encoded once, then moved off the GPU until previews.
    te_resident = 0 if _text_cached(job) else te_all
    vae = sizes["vae"] * 4  # the VAE stays in fp32 (SDXL's overflows in fp16)
    # The family says what its frozen weights cost on the GPU (fp8 storage, block swap: Flux, SD3).
    denoiser = family.denoiser_weight_bytes(t, weight_bytes)

    def need(n: float) -> int:
        return int(n * ALLOCATOR_SLACK + CONTEXT_OVERHEAD)

    loading = need(te_all + vae + (denoiser if te_resident else 0))
    training = need(denoiser + te_resident + vae + lora + activations)
    # A preview runs the denoiser forward only (no activations kept for backward) at the preview size. The text
    # encoders come back for it unless the run encoded the preview prompts beside the captions (Family.preview_embeds).
    preview = 0
    if job.sampling.every:
        size = (job.sampling.width or d.resolution) * (job.sampling.height or d.resolution) / native ** 2
        encoded_once = _text_cached(job) and type(family).preview_embeds is not Family.preview_embeds
        preview = need(denoiser + (te_resident if encoded_once else te_all) + vae + lora
                       + family.activation_gib(True) * 2**30 * size)
    return MemoryPhases(loading, training, preview)


def gpu_memory(job: Job, family: Family | str, lora_params: int) -> int:
    """Peak GPU memory of the run, bytes: the largest of loading, training and previews (``memory_phases``)."""
    return memory_phases(job, family, lora_params).peak
