"""Find, identify and load a base model offline: single-file checkpoints, diffusers folders, the local HF cache."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from studio.engine.config import BUILTIN_DEMO_MODEL, ModelSection
from studio.engine.detect import UNET, VAE, detect
from studio.engine.families import Family, family_of_unet_config, get_family
from studio.engine.safe_load import ModelLoadError, WeightsFile, open_weights
from studio.paths import resource_path, user_cache_dir

__all__ = [
    "ModelBundle", "ModelLoadError", "load_model", "demo_model_path", "resolve_model_path", "bundled_config_dir",
    "hub_snapshot", "cached_hub_models", "inspect_checkpoint", "inspect_path",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


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


# ------------------------------------------------------------------------------------------------ finding


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


_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model id if it is already in the cache; never downloads."""
    if not _HUB_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=str(hf_hub_cache()))
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed cache entry
        return None
    return Path(folder)


def cached_hub_models() -> list[dict[str, Any]]:
    """Stable Diffusion-like models in the local HF cache, for a model picker: ``[{id, path, size_bytes}]``."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(hf_hub_cache())
    except Exception:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            names = {f.file_name for f in revision.files}
            rel = {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files}
            if "model_index.json" in rel or any(n.endswith((".safetensors", ".ckpt")) for n in names):
                found.append({"id": repo.repo_id, "path": str(revision.snapshot_path), "size_bytes": revision.size_on_disk})
                break
    return found


def resolve_model_path(path: str) -> Path:
    """Turn the job's model path into a local path (the demo model is built on first use, hub ids come from the cache)."""
    if path == BUILTIN_DEMO_MODEL:
        return demo_model_path()
    local = Path(path).expanduser()
    if not local.exists() and _HUB_ID.match(path):
        snapshot = hub_snapshot(path)
        if snapshot is not None:
            return snapshot
    return local


def bundled_config_dir(family: str, prediction_type: str = "epsilon") -> Path:
    """The shipped diffusers config folder for a family (SD2 has one per prediction type: 512-base and 768-v)."""
    name = "sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family
    return resource_path("model_configs", name)


def _single_file_in(folder: Path) -> Path:
    """A hub snapshot (or folder) without model_index.json: the one checkpoint file it holds."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    if not files:
        raise ModelLoadError(
            f"'{folder}' is a folder but not a diffusers model (no model_index.json) and holds no checkpoint file; "
            "choose a .safetensors/.ckpt file or a diffusers folder"
        )
    names = ", ".join(p.name for p in files[:6])
    raise ModelLoadError(f"'{folder}' holds several checkpoint files ({names}); choose one of them")


# ------------------------------------------------------------------------------------------------ loading


def load_model(model: ModelSection, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ModelBundle:
    """Load the model the job names, offline, straight into ``dtype``; raises ModelLoadError with a readable message."""
    started = time.perf_counter()
    path = resolve_model_path(model.path)
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            bundle = _load_folder(path, model, dtype)
        elif path.is_dir():
            bundle = _load_single_file(_single_file_in(path), model, dtype)
        elif not path.exists():
            hint = (" and it is not a model in the local Hugging Face cache (LoRA Studio never downloads; "
                    "download it first)") if _HUB_ID.match(model.path) else ""
            raise ModelLoadError(f"'{model.path}' does not exist{hint}; choose a checkpoint file or a diffusers folder")
        else:
            bundle = _load_single_file(path, model, dtype)
    except ModelLoadError:
        raise
    except MemoryError:
        raise ModelLoadError(f"Not enough memory to load '{path.name}' in {str(dtype).removeprefix('torch.')}; close "
                             "other programs or choose a lower precision") from None
    except Exception as exc:  # anything diffusers/transformers raise on odd files becomes a readable message
        raise ModelLoadError(f"'{path.name}' could not be loaded: {type(exc).__name__}: {exc}") from exc
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.to(device)
    bundle.load_time_s = time.perf_counter() - started
    log.info("loaded %s (%s, %s) in %.1f s", path.name, bundle.family.name, bundle.prediction_type, bundle.load_time_s)
    return bundle


def _scheduler(config_dir: Path, prediction: str, zero_snr: bool = False) -> Any:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    overrides: dict[str, Any] = {"prediction_type": prediction}
    if zero_snr:
        # Files marked "ztsnr" were trained with zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise
        # Schedules and Sample Steps are Flawed"); their noise schedule must be rescaled the same way.
        overrides["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(scheduler.config, **overrides)


def _tokenizers(config_dir: Path, family: Family) -> list[Any]:
    from transformers import CLIPTokenizer

    from studio.engine.tokenizers import load_tokenizer

    out = []
    for index, bundled in enumerate(family.tokenizer_dirs):
        sub = config_dir / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}")
        # A config folder the user chose may carry its own tokenizer; the bundled folders do not.
        out.append(CLIPTokenizer.from_pretrained(sub, local_files_only=True) if (sub / "vocab.json").is_file()
                   else load_tokenizer(bundled))
    return out


def _check_complete(module: Any, what: str, name: str) -> None:
    """Weights a file lacks stay on the meta device after loading; say which instead of failing mid-training."""
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"'{name}' is incomplete: {len(missing)} weight(s) of the {what} are missing (e.g. {missing[0]}); "
            "the file may be damaged or a partial model"
        )


def _normalise_state_dict(w: WeightsFile, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
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


def _vae_state_dict(vae_path: Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (original or diffusers layout, or a full checkpoint) as ``first_stage_model.*`` tensors."""
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


def _load_single_file(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    with _quiet_diffusers():
        return _build_from_single_file(path, model, dtype)


def _load_folder(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    with _quiet_diffusers():
        return _load_diffusers_folder(path, model, dtype)


@contextmanager
def _quiet_diffusers():
    """diffusers warns about dtype casts and unused keys (EMA, logit scale) that are expected here."""
    from diffusers.utils import logging as diffusers_logging  # importing it resets its level, so import first

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _build_from_single_file(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    read_started = time.perf_counter()
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name, tensor=w.tensor)
    name = path.name
    if det.kind != "checkpoint" or det.problem:
        raise ModelLoadError(f"'{name}' cannot be used as the base model: {det.problem}.")
    family = get_family(model.family) if model.family != "auto" else get_family(det.family or "sd1")
    prediction = model.prediction_type if model.prediction_type != "auto" else det.prediction_type or "epsilon"
    prediction_source = "your setting (model.prediction_type)" if model.prediction_type != "auto" else det.prediction_source
    if model.config_dir:
        config_dir = Path(model.config_dir).expanduser()
        if not (config_dir / "unet" / "config.json").is_file():
            raise ModelLoadError(f"model.config_dir '{config_dir}' is not a diffusers config folder (no unet/config.json)")
        configured = _configured_prediction(config_dir)
        # A config folder the user chose outranks guesses, but not what the file itself declares.
        if model.prediction_type == "auto" and configured and not det.prediction_source.startswith(("marker", "metadata")):
            prediction, prediction_source = configured, "the scheduler config in model.config_dir"
    else:
        if not det.standard_size:
            raise ModelLoadError(
                f"'{name}' has the layout of {det.architecture} but unusual sizes, so the bundled configuration does "
                "not fit; set model.config_dir to a diffusers folder with this model's configs"
            )
        config_dir = bundled_config_dir(family.name, prediction)
    _check_config_fits(w, config_dir, name)
    read_time = time.perf_counter() - read_started

    unet_keys = [k for k in w.shapes if k.startswith(UNET)]
    te_prefixes = {"text_encoder": ("cond_stage_model.", "conditioner.embedders.0."), "text_encoder_2": ("conditioner.embedders.1.",)}
    kw = {"config": str(config_dir), "torch_dtype": dtype, "local_files_only": True}

    unet = UNet2DConditionModel.from_single_file(_normalise_state_dict(w, unet_keys), subfolder="unet", **kw)
    _check_complete(unet, "UNet", name)

    if model.vae:
        vae_path = Path(model.vae).expanduser()
        vae_sd = _vae_state_dict(vae_path)
        vae_name = vae_path.name
    else:
        vae_sd = _normalise_state_dict(w, [k for k in w.shapes if k.startswith(VAE)])
        vae_name = name
        if not vae_sd:
            raise ModelLoadError(f"'{name}' has no VAE inside; set model.vae to a VAE file (e.g. the one the model page recommends)")
    vae = AutoencoderKL.from_single_file(vae_sd, subfolder="vae", **kw)
    _check_complete(vae, "VAE", vae_name)

    encoders = []
    classes = [CLIPTextModel] if not family.is_sdxl else [CLIPTextModel, CLIPTextModelWithProjection]
    for index, cls in enumerate(classes):
        sub = "text_encoder" if index == 0 else "text_encoder_2"
        keys = [k for k in w.shapes if k.startswith(te_prefixes[sub])]
        # Each encoder gets only its own weights: diffusers' converter picks the layout by key names, and with
        # both encoders present it could take the wrong one when their widths match.
        encoder = create_diffusers_clip_model_from_ldm(cls, _normalise_state_dict(w, keys), subfolder=sub,
                                                       config=str(config_dir), torch_dtype=dtype, local_files_only=True)
        _check_complete(encoder, "text encoder" if index == 0 else "second text encoder", name)
        encoders.append(encoder)

    if unet.config.in_channels != 4:
        raise ModelLoadError(f"'{name}': the configuration gives the UNet {unet.config.in_channels} input channels; "
                             "LoRA Studio trains text-to-image models (4)")
    scheduler = _scheduler(config_dir, prediction, det.zero_terminal_snr)
    tokenizers = _tokenizers(config_dir, family)
    extra = {
        "format": w.format, "detection": det, "config_dir": str(config_dir),
        "prediction_source": prediction_source,
        "read_time_s": read_time,
    }
    if model.family != "auto" and det.family and model.family != det.family:
        extra["warning"] = f"model.family is {model.family} but the weights look like {det.architecture}"
    return ModelBundle(family, prediction, unet, vae, encoders, tokenizers, scheduler, str(path), extra=extra)


def _configured_prediction(config_dir: Path) -> str | None:
    try:
        config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("prediction_type")
    return value if value in ("epsilon", "v_prediction") else None


def _check_config_fits(w: WeightsFile, config_dir: Path, name: str) -> None:
    """Compare a few widths with the config before building anything, for a clear message instead of a shape error."""
    try:
        unet = json.loads((config_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"the model configuration in '{config_dir}' cannot be read ({exc})") from None
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


def _variant(folder: Path, weights: tuple[str, ...]) -> str | None:
    """'fp16' when a component folder only has the half-precision files (common for hub downloads)."""
    if any((folder / w).is_file() for w in weights):
        return None
    if any((folder / w.replace(".", ".fp16.", 1)).is_file() for w in weights):
        return "fp16"
    return None


def _load_diffusers_folder(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = index.get("_class_name", "")
    if pipeline_class and pipeline_class not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline") and not (path / "unet").is_dir():
        raise ModelLoadError(f"'{path.name}' is a {pipeline_class} folder; LoRA Studio trains Stable Diffusion 1.x, "
                             "2.x and SDXL models")
    unet_config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    if unet_config.get("in_channels", 4) != 4:
        raise ModelLoadError(f"'{path.name}' is an inpainting or image-editing model (its UNet takes "
                             f"{unet_config['in_channels']} input channels); use the text-to-image version")
    diffusers_w = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    hf_w = ("model.safetensors", "pytorch_model.bin")
    kw = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=_variant(path / "unet", diffusers_w), **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=_variant(path / "vae", diffusers_w), **kw)
        text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                       variant=_variant(path / "text_encoder", hf_w), **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)]
        if (path / "text_encoder_2").is_dir():
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", variant=_variant(path / "text_encoder_2", hf_w), **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True))
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"'{path}' looks like a diffusers folder but a part could not be read: {exc}") from exc
    family = get_family(model.family) if model.family != "auto" else family_of_unet_config(unet.config, len(text_encoders))
    prediction = model.prediction_type if model.prediction_type != "auto" else scheduler.config.prediction_type
    if model.prediction_type != "auto":
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction)
    if model.vae:
        vae = _separate_vae(Path(model.vae).expanduser(), path, dtype)
    extra = {"format": "diffusers", "prediction_source": "your setting (model.prediction_type)"
             if model.prediction_type != "auto" else "the folder's scheduler config"}
    return ModelBundle(family, prediction, unet, vae, text_encoders, tokenizers, scheduler, str(path), extra=extra)


def _separate_vae(vae_path: Path, config_dir: Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_single_file(_vae_state_dict(vae_path), config=str(config_dir), subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True)
    _check_complete(vae, "VAE", vae_path.name)
    return vae


# ------------------------------------------------------------------------------------------------ inspecting


def inspect_checkpoint(path: str | os.PathLike, *, hashes: bool = False, load: bool = False,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Describe a base model (file, diffusers folder or cached hub id) without loading it; see studio.engine.inspection."""
    from studio.engine.inspection import inspect_checkpoint as _inspect

    return _inspect(path, hashes=hashes, load=load, progress=progress)


def inspect_path(path: str | os.PathLike, *, hashes: bool = False, load: bool = False) -> dict[str, Any]:
    """Describe whatever ``path`` is (checkpoint, LoRA file, dataset folder); the result's "kind" says which."""
    from studio.engine.inspection import inspect_path as _inspect

    return _inspect(path, hashes=hashes, load=load)
