"""The training job: declared once (default, help, range, choices) and used by TOML, CLI, GUI and validation."""

from __future__ import annotations

import copy
import sys
import dataclasses
import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, get_origin, get_type_hints

import tomli_w

from studio.engine.families import names as family_names

SCHEMA_VERSION = 1
BUILTIN_DEMO_MODEL = "builtin:demo"


def option(
    default: Any,
    help: str,
    *,
    label: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    advanced: bool = False,
    unit: str = "",
) -> Any:
    """A job field: its metadata feeds TOML, ``--help``, GUI tooltips and spin-box ranges, and validation."""
    meta = {"help": help, "label": label, "min": min, "max": max, "choices": choices, "advanced": advanced, "unit": unit}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    path: str = option(
        BUILTIN_DEMO_MODEL,
        "Base model: a single-file checkpoint (.safetensors/.ckpt), a diffusers folder, or a Hugging Face id "
        f"already in the local cache. '{BUILTIN_DEMO_MODEL}' is a tiny random model for trying the app.",
        label="Base model",
    )
    family: str = option(
        "auto", "Model family. 'auto' detects it from the weights.", choices=("auto", *family_names()), advanced=True
    )
    prediction_type: str = option(
        "auto",
        "What the model predicts. 'auto' reads it from the model; SD2-768 models use v_prediction.",
        choices=("auto", "epsilon", "v_prediction"),
        advanced=True,
    )
    vae: str = option(
        "", "Separate VAE file (.safetensors) to use instead of the checkpoint's own, or for a model file that does "
        "not carry one; empty uses the model's own or finds it next to the model.", advanced=True)
    # Parts a transformer-only file (FLUX.1, SD3.5 …) lacks; the Model page asks for them by the family's part names
    # (which encoder is which: the family's parts(), e.g. FLUX.1 CLIP-L + T5-XXL, SD3 CLIP-L + CLIP-G + T5-XXL).
    text_encoder: str = option(
        "", "Separate first text encoder file (e.g. clip_l.safetensors) for a model file that does not carry it; "
        "empty finds it next to the model or in ComfyUI/A1111's model folders.", advanced=True)
    text_encoder_2: str = option(
        "", "Separate second text encoder file (FLUX.1: t5xxl_fp16.safetensors; SD3: clip_g.safetensors) for a model "
        "file that does not carry it; empty finds it next to the model or in ComfyUI/A1111's model folders.",
        advanced=True)
    text_encoder_3: str = option(
        "", "Separate third text encoder file (SD3: t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors; optional, "
        "zeros in its place without it) for a model file that does not carry it; empty finds it next to the model or "
        "in ComfyUI/A1111's model folders.", advanced=True)
    config_dir: str = option(
        "",
        "Optional diffusers config folder for a single-file checkpoint of unusual shape; normally the bundled "
        "config for the detected family is used.",
        advanced=True,
    )


@dataclass
class DatasetSection:
    path: str = option("", "Folder of images (png/jpg/webp/bmp) with same-name .txt captions.", label="Image folder")
    caption_extension: str = option(".txt", "File extension of caption files.", advanced=True)
    trigger_word: str = option(
        "", "Word that calls up your concept; prepended to every caption and used when a caption is missing."
    )
    repeats: dict = option(
        {},
        "Repeats per sub-folder, e.g. {faces = 3}. Folders named like '10_name' use that number unless set here.",
        advanced=True,
    )
    default_repeats: int = option(1, "How often each image is seen per epoch.", min=1, max=1000)
    shuffle_tags: bool = option(False, "Shuffle comma-separated caption tags each time an image is used.", advanced=True)
    keep_tokens: int = option(0, "With tag shuffling: keep the first N tags in place.", min=0, max=100, advanced=True)
    caption_dropout: float = option(
        0.0, "Fraction of steps that train with an empty caption.", min=0.0, max=1.0, advanced=True
    )
    resolution: int = option(512, "Training resolution in pixels (SD1: 512, SD2-768: 768, SDXL: 1024).", min=64, max=4096, unit="px")
    buckets: bool = option(True, "Group images by aspect ratio instead of cropping them square.")
    bucket_step: int = option(64, "Bucket sizes are multiples of this many pixels.", min=8, max=256, advanced=True, unit="px")
    random_flip: bool = option(False, "Mirror images at random (do not use for text or asymmetric subjects).")


@dataclass
class LoraSection:
    rank: int = option(16, "LoRA rank (dim): capacity of the LoRA; 4–32 suits most styles and characters.", min=1, max=1024)
    alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / rank.", min=0.0001, max=4096)
    dropout: float = option(0.0, "Dropout on the LoRA path.", min=0.0, max=0.99, advanced=True)
    targets: str = option(
        "kohya-default",
        "Which layers get a LoRA: 'attention' (q/k/v/out), 'kohya-default' (attention, projections and "
        "feed-forward), '+conv' (also the ResNet convolutions: LoCon).",
        choices=("attention", "kohya-default", "+conv"),
    )
    conv_rank: int = option(0, "Rank of convolution LoRAs with '+conv'; 0 uses the LoRA rank.", min=0, max=1024, advanced=True)
    conv_alpha: float = option(0.0, "Alpha of convolution LoRAs with '+conv'; 0 uses the LoRA alpha.", min=0.0, max=4096, advanced=True)
    dora: bool = option(False, "Weight-decomposed LoRA (DoRA): often better quality, slower steps.", advanced=True)
    train_text_encoder: bool = option(False, "Also train LoRAs on the text encoder(s).")
    text_encoder_lr: float = option(5e-5, "Learning rate of the text-encoder LoRAs.", min=0.0, max=1.0, advanced=True)
    # --- adapter type and its options (studio/engine/adapters/; one block, declared once) ---
    algorithm: str = option(
        "lora",
        "Adapter type: 'lora' (LoRA; with '+conv' LoCon, with DoRA on DoRA), 'loha' (LyCORIS LoHa: Hadamard "
        "product of two low-rank pairs, more capacity per parameter), 'lokr' (LyCORIS LoKr: Kronecker product, "
        "very small files). All load in ComfyUI, A1111/Forge and InvokeAI; LoHa/LoKr not in diffusers.",
        label="Adapter type", choices=("lora", "loha", "lokr"),
    )
    lokr_factor: int = option(
        -1, "LoKr: split each weight side into factor × rest; -1 splits as evenly as possible (smallest file), "
        "4–16 give the big Kronecker factor more of the weight.", min=-1, max=1024, label="LoKr factor", advanced=True,
    )
    lokr_decompose_both: bool = option(
        False, "LoKr: also make the small Kronecker factor low-rank (fewer parameters).", label="LoKr: decompose both",
        advanced=True,
    )
    lokr_full_matrix: bool = option(
        False, "LoKr: train both Kronecker factors as full matrices (rank and alpha are not used; largest LoKr).",
        label="LoKr: full matrix", advanced=True,
    )
    dora_target: str = option(
        "lycoris",
        "DoRA files: 'lycoris' writes the trained magnitude (exact in LyCORIS and diffusers-style loaders), "
        "'comfyui' rescales it for ComfyUI/Forge's formula (exact there, on this base model only). A1111 cannot "
        "apply DoRA as trained either way; the export report says so.",
        label="DoRA target", choices=("lycoris", "comfyui"), advanced=True,
    )


@dataclass
class TrainingSection:
    steps: int = option(1000, "Optimizer steps to train.", min=1, max=1_000_000)
    epochs: int = option(0, "If above 0, train this many passes over the data instead of 'steps'.", min=0, max=100_000, advanced=True)
    batch_size: int = option(1, "Images per step.", min=1, max=512)
    gradient_accumulation: int = option(1, "Steps whose gradients are summed before the optimizer steps.", min=1, max=1024, advanced=True)
    lr: float = option(1e-4, "Learning rate of the UNet LoRA (Prodigy: use 1.0).", min=0.0, max=10.0, label="Learning rate")
    optimizer: str = option(
        "adamw",
        "Optimizer. 'adamw8bit' needs bitsandbytes and a CUDA GPU; 'prodigy' finds its own step size (set lr 1.0).",
        choices=("adamw", "adamw8bit", "prodigy", "adafactor"),
    )
    scheduler: str = option("constant", "Learning-rate schedule after warm-up.", choices=("constant", "cosine", "linear"))
    warmup_steps: int = option(0, "Steps over which the learning rate ramps up from zero.", min=0, max=1_000_000, advanced=True)
    mixed_precision: str = option(
        "auto", "Compute precision. 'auto' picks bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.",
        choices=("auto", "no", "fp16", "bf16"), advanced=True,
    )
    gradient_checkpointing: bool = option(False, "Trade ~30 % speed for much less GPU memory.")
    seed: int = option(42, "Random seed: the same seed and job give the same LoRA.", min=0, max=2**32 - 1)
    noise_offset: float = option(0.0, "Noise offset (0.05–0.1 helps very dark/bright images).", min=0.0, max=1.0, advanced=True)
    min_snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (Hang et al. 2023); 5 is typical, 0 turns it off.", min=0.0, max=100.0, advanced=True)
    max_token_length: int = option(
        75, "How many caption tokens the text encoder reads. 75 is CLIP's own limit (longer captions are cut); 150 "
        "or 225 read long captions in 75-token pieces, as kohya's sd-scripts and A1111 do (use the LoRA with long "
        "prompts then).", choices=("75", "150", "225"), label="Caption tokens", advanced=True,
    )
    clip_skip: int = option(
        1, "Which text-encoder layer conditions the model, counted from the end: 1 is the base models' own (SDXL: "
        "its penultimate layer), 2 the one before it, which many anime SD 1.x models were made with. Use the value "
        "your base model expects.", min=1, max=12, label="Clip skip", advanced=True,
    )
    max_grad_norm: float = option(1.0, "Clip gradients to this norm; 0 turns clipping off.", min=0.0, max=1000.0, advanced=True)
    device: str = option("auto", "Where to train. 'auto' uses a GPU when there is one.", choices=("auto", "cpu", "cuda", "mps"), advanced=True)
    cache_latents: bool = option(True, "Encode every image with the VAE once before training instead of every step.", advanced=True)
    cache_text_embeddings: bool = option(
        True, "Encode captions once when the text encoder is frozen and captions do not change.", advanced=True
    )
    cache_to_disk: bool = option(
        True, "Also keep the caches on disk, so later runs on the same images and model skip the encoding.", advanced=True
    )
    attention: str = option("sdpa", "Attention kernel: PyTorch's fused SDPA, or the plain math version.", choices=("sdpa", "classic"), advanced=True)
    channels_last: bool = option(False, "Use channels-last memory format for the UNet (faster on some GPUs).", advanced=True)
    compile: bool = option(False, "Compile the denoiser (UNet or transformer) with torch.compile: a slower start, "
                           "faster steps.", advanced=True)
    compile_scope: str = option(
        "blocks", "What 'compile' compiles: 'blocks' (each repeated transformer block once, reused: the quicker start) "
        "or 'denoiser' (all of it: a longer start, no breaks between blocks).", choices=("blocks", "denoiser"),
        advanced=True,
    )
    compile_backend: str = option(
        "inductor", "How 'compile' compiles: 'inductor' generates fused kernels (fastest; needs a C++ compiler, and "
        "Triton on NVIDIA GPUs); 'aot_eager' only traces forward and backward into graphs (no compiler needed: the "
        "fallback when inductor fails to build).", choices=("inductor", "aot_eager"), advanced=True,
    )
    cuda_graphs: bool = option(
        False, "With 'compile': record the denoiser's forward and backward as CUDA graphs, one per bucket shape, and "
        "replay them (torch.compile's reduce-overhead mode). Cuts the per-kernel launch cost that holds small batches "
        "back; costs a recording per shape and some GPU memory. Best with compile scope 'denoiser' (one graph per "
        "step, not one per block). NVIDIA GPUs, one process, no block swap.",
        label="CUDA graphs", advanced=True,
    )
    tf32: bool = option(
        True, "Run fp32 matrix products and convolutions in TF32 on GPUs that have it (NVIDIA Ampere and newer): "
        "several times faster fp32, at about 1e-3 relative precision. No effect elsewhere.", label="TF32", advanced=True,
    )
    fused_optimizer: bool = option(True, "Use the fused/foreach AdamW implementation when available.", advanced=True)
    dataloader_workers: int = option(0, "Background processes that load images when latents are not cached.", min=0, max=64, advanced=True)
    # Flow-matching families (Flux.1, SD3.x): how σ is drawn and weighted (families/flow.py); others ignore these.
    flow_timestep_sampling: str = option(
        "logit_normal",
        "Flow models (Flux, SD3): how noise levels are drawn. 'logit_normal' favours the middle (SD3 paper), "
        "'uniform' draws all alike, 'mode' peaks where 'flow mode scale' puts it.",
        choices=("logit_normal", "uniform", "mode"), advanced=True,
    )
    flow_logit_mean: float = option(0.0, "Flow models, logit-normal sampling: mean (above 0 trains noisier steps more).", min=-5.0, max=5.0, advanced=True)
    flow_logit_std: float = option(1.0, "Flow models, logit-normal sampling: spread.", min=0.01, max=10.0, advanced=True)
    flow_mode_scale: float = option(1.29, "Flow models, 'mode' sampling: scale of the mode density (SD3 paper: 1.29).", min=-1.0, max=2.0, advanced=True)
    flow_shift: str = option(
        "auto",
        "Flow models: shift of the noise levels towards the noisy end. 'auto' uses the family's own (Flux: by "
        "resolution, SD3: constant), 'constant' uses 'flow shift value', 'resolution' Flux's shift from the image size.",
        choices=("auto", "none", "constant", "resolution"), advanced=True,
    )
    flow_shift_value: float = option(3.0, "Flow models, constant shift: the shift factor (SD3: 3.0; 1 = no shift).", min=0.1, max=100.0, advanced=True)
    flow_loss_weighting: str = option(
        "none", "Flow models: loss weight per noise level ('sigma_sqrt', 'cosmap' as diffusers' SD3 script; 'none' is usual).",
        choices=("none", "sigma_sqrt", "cosmap"), advanced=True,
    )
    base_weights_fp8: bool = option(
        False, "Big transformer models (Flux, SD3.5 Large): store the frozen base weights in fp8 (float8_e4m3fn), "
        "computing in bf16: about half the GPU memory of bf16 weights, with a small loss of precision. Applied while "
        "loading, in CPU memory, before the model reaches the GPU (which never holds a bf16 copy: FLUX.1 dev arrives "
        "as 12 GB instead of 24 GB); T5-XXL is stored in fp8 too. The LoRA itself trains in fp32.",
        label="Base weights in fp8",
        advanced=True,
    )
    block_swap: int = option(
        0, "Big transformer models (Flux, SD3.5 Large): keep this many transformer blocks in CPU memory (in fp8 with "
        "'base weights in fp8'; they never reach the GPU at load) and move each to the GPU only while it runs (slower "
        "steps, less GPU memory; use with gradient checkpointing). 0 keeps all on the GPU.",
        min=0, max=64, advanced=True,
    )
    guidance: float = option(
        1.0, "Flux.1 [dev]: the value its guidance input gets while training (1.0 is usual); models without one ignore it.",
        min=0.0, max=30.0, label="Training guidance", advanced=True,
    )


@dataclass
class SamplingSection:
    prompts: list = option(
        [], "Prompts for preview images; empty uses the first captions of the dataset. '{trigger}' is replaced.",
    )
    negative_prompt: str = option("", "Negative prompt for preview images.", advanced=True)
    every: int = option(
        -1, "Make preview images every N steps; 0 turns previews off; -1 (auto) about every 5 minutes of training, "
        "judged from the estimated time per step.", min=-1, max=1_000_000, label="Sample every",
    )
    steps: int = option(20, "Denoising steps per preview image.", min=1, max=200, advanced=True)
    guidance: float = option(7.0, "Classifier-free guidance scale for previews.", min=0.0, max=50.0, advanced=True)
    seed: int = option(1234, "Seed of the preview images (the same for every step, so they are comparable).", min=0, max=2**32 - 1, advanced=True)
    width: int = option(0, "Preview width; 0 uses the training resolution.", min=0, max=4096, advanced=True, unit="px")
    height: int = option(0, "Preview height; 0 uses the training resolution.", min=0, max=4096, advanced=True, unit="px")


@dataclass
class ValidationSection:
    # Validation loss (knowing when to stop): the denoising loss on images the LoRA never trains on, with the same
    # noise and timesteps at every evaluation, so its curve moves only when the weights do.
    split: float = option(
        0.0, "Hold out images from training to measure the validation loss on: below 1 a share of the images "
        "(0.1 = 10 %), 1 or more a number of images. 0 holds out none.", min=0.0, max=100_000,
        label="Validation images held out",
    )
    folder: str = option(
        "", "A folder of your own validation images (with captions) instead of holding out training images.",
        label="Validation folder",
    )
    every: int = option(
        50, "Measure the validation loss every N steps (and at the start and the end), when there are validation "
        "images; 0 turns it off (held-out images still stay out of training).", min=0, max=1_000_000, label="Validate every",
    )
    images: int = option(8, "At most this many validation images are evaluated (fewer is faster).", min=1, max=1024,
                         advanced=True)
    timesteps: int = option(
        4, "Noise draws per image at each evaluation (fixed noise and timesteps from a fixed seed, the same every "
        "time): more gives a steadier curve, each costs one forward pass per image.", min=1, max=64, advanced=True,
    )


@dataclass
class OutputSection:
    dir: str = option("", "Run folder. An existing non-empty folder is never overwritten: a numbered one is made.", label="Run folder")
    name: str = option("my-lora", "File name of the LoRA (without .safetensors); also its name in A1111/ComfyUI.")
    title: str = option("", "Title written into the LoRA's metadata (defaults to the name).", advanced=True)
    description: str = option("", "Description written into the LoRA's metadata.", advanced=True)
    save_every: int = option(0, "Save a resumable checkpoint and an intermediate LoRA every N steps; 0 saves only at the end.", min=0, max=1_000_000)
    keep_last: int = option(3, "How many intermediate checkpoints to keep.", min=1, max=1000, advanced=True)
    keep_last_loras: int = option(
        3, "How many intermediate LoRAs (the files named by step) to keep; older ones are deleted as new ones are "
        "saved. 0 keeps all. The final LoRA and files you renamed are never deleted.", min=0, max=100_000,
        label="Keep last LoRAs", advanced=True,
    )
    save_dtype: str = option("fp16", "Precision of the exported LoRA.", choices=("fp16", "bf16", "fp32"), advanced=True)
    save_diffusers: bool = option(False, "Also write a diffusers/PEFT-layout copy (does not load in A1111).", advanced=True)


@dataclass
class Job:
    schema_version: int = SCHEMA_VERSION
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    output: OutputSection = field(default_factory=OutputSection)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Job) if f.name != "schema_version")


# ---------------------------------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class FieldInfo:
    """Everything a consumer needs to know about one job field, e.g. ``training.lr``."""

    path: str
    type: type
    default: Any
    help: str
    label: str
    min: float | None
    max: float | None
    choices: tuple[str, ...] | None
    advanced: bool
    unit: str


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints compiles every (string) annotation on each call: field_info() runs it per field lookup, and
    # the window looks fields up by the hundred (tens of ms of GIL-held work per job change, felt as a stall).
    return get_type_hints(cls)


def _section_types() -> dict[str, type]:
    return {name: tp for name, tp in _hints(Job).items() if name != "schema_version"}


@functools.cache
def _declarations() -> dict[str, tuple[Any, dataclasses.Field]]:
    """``section.field`` → (its type hint, its dataclass field), in declaration order; built once.

    Loading a job looks up each of its ~90 values: a scan of every field per lookup made ``load_job`` O(n²), 60 ms
    of Python on the GUI thread each time the window read a run's job.toml.
    """
    out = {}
    for section, section_type in _section_types().items():
        hints = _hints(section_type)
        for f in dataclasses.fields(section_type):
            out[f"{section}.{f.name}"] = (hints[f.name], f)
    return out


def _info(path: str, hint: Any, f: dataclasses.Field) -> FieldInfo:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    label = meta.get("label") or f.name.replace("_", " ").capitalize()
    return FieldInfo(
        path=path, type=get_origin(hint) or hint, default=default,
        help=meta["help"], label=label, min=meta.get("min"), max=meta.get("max"),
        choices=meta.get("choices"), advanced=meta.get("advanced", False), unit=meta.get("unit", ""),
    )


def iter_fields() -> Iterator[FieldInfo]:
    """All job fields in declaration order."""
    for path, (hint, f) in _declarations().items():
        yield _info(path, hint, f)


def field_info(path: str) -> FieldInfo:
    try:
        hint, f = _declarations()[path]
    except KeyError:
        raise KeyError(f"unknown job field '{path}'") from None
    return _info(path, hint, f)


def get_value(job: Job, path: str) -> Any:
    section, name = path.split(".", 1)
    return getattr(getattr(job, section), name)


class ConfigError(ValueError):
    """A job file or override that cannot be read; ``problems`` lists every one at once."""

    def __init__(self, problems: list["Problem"], source: str = "job"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: the field it concerns and what to do about it."""

    field: str
    message: str
    severity: str = "error"  # "error" blocks training, "warning" does not

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def coerce(info: FieldInfo, value: Any) -> Any:
    """Convert a TOML/CLI/GUI value to the field's type, or raise ValueError saying what is expected."""
    tp = info.type
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {value!r}")
    if tp is list:
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"expected a list of text, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"expected whole numbers of at least 1, got {k} = {v!r}")
                out[str(k)] = v
            return out
        raise ValueError(f"expected a table like {{folder = 3}}, got {value!r}")
    raise TypeError(f"unsupported field type {tp}")  # pragma: no cover - a programming error


def set_value(job: Job, path: str, value: Any) -> None:
    """Set ``section.field`` after coercing the value; raises KeyError/ValueError naming the field."""
    info = field_info(path)
    section, name = path.split(".", 1)
    setattr(getattr(job, section), name, coerce(info, value))


def parse_cli_value(text: str) -> Any:
    """Read ``--set key=value`` values as TOML where they parse (numbers, lists, tables), else as text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_values(job: Job, values: dict[str, Any]) -> list[Problem]:
    """Set each ``section.field``; unknown names and bad values come back as problems instead of raising."""
    problems = []
    known = _declarations().keys()
    for path, value in values.items():
        if path not in known:
            problems.append(Problem(path, f"unknown setting{_suggestion(path, known)}"))
            continue
        try:
            set_value(job, path, value)
        except ValueError as exc:
            problems.append(Problem(path, str(exc)))
    return problems


def apply_overrides(job: Job, overrides: dict[str, Any]) -> None:
    """Apply ``{"training.lr": 1e-4, ...}``; every bad key or value is reported at once."""
    problems = _set_values(job, overrides)
    if problems:
        raise ConfigError(problems, "settings")


def _suggestion(path: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "; see `lora-studio train --help` for the list"


# ------------------------------------------------------------------------------------------------------ TOML

# Each entry upgrades a job dict from version N to N+1; the loader applies them in order.
MIGRATIONS: dict[int, Any] = {}


def job_from_dict(data: dict, source: str = "job") -> Job:
    """Build a Job from a parsed TOML dict; unknown keys and wrong types are errors, reported together."""
    data = copy.deepcopy(data)
    problems: list[Problem] = []
    version = data.pop("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version < 1:
        raise ConfigError([Problem("schema_version", f"must be a whole number ≥ 1, got {version!r}")], source)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            [Problem("schema_version", f"this file is version {version}, newer than this LoRA Studio understands "
                     f"({SCHEMA_VERSION}); update LoRA Studio to open it")], source)
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    job = Job()
    for section, values in data.items():
        if section not in SECTIONS:
            problems.append(Problem(section, f"unknown section{_suggestion(section, set(SECTIONS))}"))
            continue
        if not isinstance(values, dict):
            problems.append(Problem(section, "must be a table ([section]) of settings"))
            continue
        problems += _set_values(job, {f"{section}.{key}": value for key, value in values.items()})
    if problems:
        raise ConfigError(problems, source)
    return job


def job_to_dict(job: Job) -> dict:
    out: dict[str, Any] = {"schema_version": job.schema_version}
    for section in SECTIONS:
        out[section] = dataclasses.asdict(getattr(job, section))
    return out


def load_job(path: str | os.PathLike) -> Job:
    """Read a job TOML file; raises ConfigError naming the file and every problem in it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("job", f"file not found: {path}")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("job", f"cannot read {path}: {exc}")], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("job", f"not valid TOML ({exc}); check the quotes and brackets there")], str(path)) from None
    return job_from_dict(data, str(path))


def dumps_job(job: Job) -> str:
    return tomli_w.dumps(job_to_dict(job))


def save_job(job: Job, path: str | os.PathLike) -> None:
    """Write the job as TOML atomically (a crash never leaves half a file under the name)."""
    from studio.engine.fileio import atomic_write_text

    atomic_write_text(Path(path), dumps_job(job))


# ------------------------------------------------------------------------------------------------ validation

# fullmatch, not "$": "$" also matches before a trailing newline, which would let "name\n" through to a file name.
_NAME_RE = re.compile(r"[\w.\- ]+")


def optimizer_device_problem(optimizer: str, device_type: str | None) -> str | None:
    """Why ``optimizer`` cannot run on a ``device_type`` ("cpu", "cuda", "mps") device, as a sentence; None when it can
    (or the device is not known yet). One sentence for the Settings page, the CLI and the trainer."""
    if optimizer == "adamw8bit" and device_type in ("cpu", "mps"):
        return (f"8-bit AdamW (bitsandbytes) needs an NVIDIA GPU with CUDA, and this job trains on the "
                f"{device_type.upper()}; set training.optimizer to 'adamw'")
    return None


def _cuda_graph_problems(t: "TrainingSection", device_type: str | None) -> list[Problem]:
    """Why ``training.cuda_graphs`` cannot be used as set, if it cannot."""
    if not t.cuda_graphs:
        return []
    problems = []
    if not t.compile:
        problems.append(Problem("training.cuda_graphs", "CUDA graphs are recorded by torch.compile: turn on "
                                "training.compile as well (or turn CUDA graphs off)"))
    if device_type in ("cpu", "mps"):
        where = "this machine has no NVIDIA GPU" if t.device == "auto" else f"training.device is '{t.device}'"
        problems.append(Problem("training.cuda_graphs", f"CUDA graphs need an NVIDIA GPU and {where}; turn CUDA "
                                "graphs off"))
    if t.block_swap:
        problems.append(Problem("training.cuda_graphs", "block swap moves weights between the host and the GPU "
                                "during each step, which a recorded CUDA graph cannot follow; set "
                                "training.block_swap to 0 or turn CUDA graphs off"))
    return problems


def validate(job: Job, *, check_paths: bool = True, device_type: str | None = None) -> list[Problem]:
    """Every problem with the job at once, each naming the field and what to do.

    ``device_type`` is what training.device = 'auto' means on this machine, when the caller knows it (the window
    detects it at start, preflight asks torch); without it only an explicit device is checked against the job.
    """
    problems: list[Problem] = []
    for info in iter_fields():
        value = get_value(job, info.path)
        if info.choices and str(value) not in info.choices:  # choices are written as text, also for numbers
            problems.append(Problem(info.path, f"'{value}' is not one of: {', '.join(info.choices)}"))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                problems.append(Problem(info.path, "must be a number"))
            elif info.min is not None and value < info.min:
                problems.append(Problem(info.path, f"must be at least {info.min:g}, got {value:g}"))
            elif info.max is not None and value > info.max:
                problems.append(Problem(info.path, f"must be at most {info.max:g}, got {value:g}"))

    d, t, lo, s, o = job.dataset, job.training, job.lora, job.sampling, job.output
    if d.resolution % 8:
        problems.append(Problem("dataset.resolution", f"must be a multiple of 8 (e.g. {d.resolution // 8 * 8}), got {d.resolution}"))
    if d.caption_extension and not d.caption_extension.startswith("."):
        problems.append(Problem("dataset.caption_extension", f"must start with a dot, e.g. '.{d.caption_extension}'"))
    for w, name in ((s.width, "sampling.width"), (s.height, "sampling.height")):
        if w % 8:
            problems.append(Problem(name, f"must be a multiple of 8 or 0, got {w}"))
    if not o.name.strip() or not _NAME_RE.fullmatch(o.name):
        problems.append(Problem("output.name", "use letters, digits, spaces, '.', '-' or '_' only (it becomes a file name)"))
    if t.optimizer == "prodigy" and t.lr < 0.1:
        problems.append(Problem("training.lr", "Prodigy adapts its own step size; set the learning rate to 1.0", "warning"))
    if lo.rank >= 1 and lo.alpha > 4 * lo.rank:
        problems.append(Problem("lora.alpha", f"alpha {lo.alpha:g} is far above rank {lo.rank}: the update is scaled by "
                                 f"{lo.alpha / lo.rank:g}×; usual values are rank/2 to rank", "warning"))
    if lo.algorithm == "lokr" and lo.lokr_factor not in (-1,) and lo.lokr_factor < 2:
        problems.append(Problem("lora.lokr_factor", f"must be -1 (automatic) or at least 2, got {lo.lokr_factor}"))
    if lo.dora and lo.algorithm != "lora":
        problems.append(Problem("lora.dora", f"DoRA is trained with the 'lora' adapter type; turn it off for "
                                f"'{lo.algorithm}' or set lora.algorithm = 'lora'"))
    if lo.dora and t.base_weights_fp8:
        # peft's DoRA computes the norm of the frozen weight itself, outside the fp8 casting hook (fp8 + fp32 fails).
        problems.append(Problem("lora.dora", "DoRA cannot train over base weights stored in fp8 (it reads the frozen "
                                "weight itself); turn off lora.dora or training.base_weights_fp8"))
    problems += _cuda_graph_problems(t, device_type if t.device == "auto" else t.device)
    if t.compile and getattr(sys, "frozen", False):
        problems.append(Problem("training.compile", "the installed app has no compiler for torch.compile; turn it off "
                                "(or run LoRA Studio from a Python install to use it)"))
    optimizer_problem = optimizer_device_problem(t.optimizer, device_type if t.device == "auto" else t.device)
    if optimizer_problem:
        problems.append(Problem("training.optimizer", optimizer_problem))
    if t.block_swap and not t.gradient_checkpointing:
        problems.append(Problem("training.block_swap", "block swap saves memory only with gradient checkpointing "
                                "(otherwise backward keeps every block's weights); turn gradient checkpointing on",
                                "warning"))
    if t.mixed_precision == "fp16" and t.device == "cpu":
        problems.append(Problem("training.mixed_precision", "fp16 is not supported on the CPU; use 'no' or 'bf16'"))

    problems += _validation_problems(job.validation, check_paths)
    if check_paths:
        problems += _validate_paths(job)
    return problems


def _validation_problems(v: "ValidationSection", check_paths: bool) -> list[Problem]:
    problems = []
    if 0.5 < v.split < 1:
        problems.append(Problem("validation.split", f"holding out {v.split:.0%} of the images leaves too few to train "
                                "on; use at most 0.5 (or a number of images, 1 or more)"))
    elif v.split >= 1 and not float(v.split).is_integer():
        problems.append(Problem("validation.split", f"{v.split:g} is neither a share below 1 nor a whole number of "
                                "images; use e.g. 0.1 or 4"))
    if v.folder.strip() and v.split:
        problems.append(Problem("validation.split", "a validation folder is set, so no training images are held out; "
                                "set this to 0 (or clear the folder)", "warning"))
    if check_paths and v.folder.strip() and not Path(v.folder).expanduser().is_dir():
        problems.append(Problem("validation.folder", f"'{v.folder}' is not a folder; pick the folder with your "
                                "validation images, or clear the field to hold out training images instead"))
    return problems


def _validate_paths(job: Job) -> list[Problem]:
    problems = []
    model = job.model.path.strip()
    if not model:
        problems.append(Problem("model.path", "choose a base model (a .safetensors/.ckpt file or a diffusers folder)"))
    elif model != BUILTIN_DEMO_MODEL and not Path(model).expanduser().exists() and not _looks_like_hub_id(model):
        problems.append(Problem("model.path", f"'{model}' does not exist; pick a checkpoint file or diffusers folder"))
    if job.model.vae and not Path(job.model.vae).expanduser().is_file():
        problems.append(Problem("model.vae", f"VAE file '{job.model.vae}' does not exist; clear the field to use the model's own"))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        value = getattr(job.model, name)
        if value and not Path(value).expanduser().is_file():
            problems.append(Problem(f"model.{name}", f"'{value}' does not exist; choose the file, or clear the field "
                                    "to find it next to the model"))
    if job.model.config_dir and not Path(job.model.config_dir).expanduser().is_dir():
        problems.append(Problem("model.config_dir", f"'{job.model.config_dir}' is not a folder"))
    data = job.dataset.path.strip()
    if not data:
        problems.append(Problem("dataset.path", "choose the folder with your training images"))
    elif not Path(data).expanduser().is_dir():
        problems.append(Problem("dataset.path", f"'{data}' is not a folder; pick the folder that holds the images"))
    if not job.output.dir.strip():
        problems.append(Problem("output.dir", "choose where the run folder goes"))
    else:
        out = Path(job.output.dir).expanduser()
        parent = next((p for p in [out, *out.parents] if p.exists()), None)
        if parent is not None and not parent.is_dir():
            problems.append(Problem("output.dir", f"'{parent}' is a file, not a folder"))
        elif parent is not None and not os.access(parent, os.W_OK):
            problems.append(Problem("output.dir", f"'{parent}' is not writable; choose a folder you can write to"))
    return problems


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", text)) and not Path(text).exists()


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]
