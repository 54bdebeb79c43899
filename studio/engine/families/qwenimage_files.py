"""Qwen-Image files as ComfyUI keeps them: the transformer alone (qwen_image_bf16.safetensors, diffusers' own key
names, sometimes under "model.diffusion_model."), Qwen2.5-VL-7B (qwen_2.5_vl_7b.safetensors: transformers' older
"model." / "visual." / "lm_head." layout) and the VAE (qwen_image_vae.safetensors: Wan 2.1's original layout, or
diffusers'), each chosen on the Model page or found beside the model / in ComfyUI's model folders, loaded offline.

Qwen2.5's tokenizer is not bundled (151 k BPE tokens): it comes from a tokenizer folder beside the files, the
model.config_dir's, ComfyUI's own copy (comfy/text_encoders/qwen25_tokenizer) or the local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.families.base import ModelBundle
from studio.engine.families.loading import check_complete
from studio.engine.safe_load import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.detect import Detection
    from studio.engine.families.qwenimage import QwenImageFamily
    from studio.engine.safe_load import WeightsFile

_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_TRANSFORMER_MARKS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")
# Qwen2's attention has q/k/v biases (Qwen3's has none but per-head norms): a Qwen2.5 language model, older or newer layout.
_QWEN25_MARKS = ("model.layers.0.self_attn.q_proj.bias", "model.language_model.layers.0.self_attn.q_proj.bias")
_WAN_VAE_MARKS = ("encoder.conv1.weight", "decoder.head.2.weight")
_DIFFUSERS_VAE_MARKS = ("encoder.conv_in.weight", "decoder.conv_out.weight")
_NAME_HINTS = {"text_encoder": ("qwen", "vl", "text_encoder"), "vae": ("vae", "qwen_image")}
TOKENIZER_HINT = ("Qwen2.5's tokenizer (a 'tokenizer' folder with vocab.json + merges.txt, e.g. the one of the "
                  "Qwen/Qwen-Image download, or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")


def transformer_prefix(shapes: Mapping[str, Any]) -> str | None:
    """The key prefix of a file holding a Qwen-Image transformer (diffusers' names), else None."""
    for prefix in _PREFIXES:
        if all(prefix + k in shapes for k in _TRANSFORMER_MARKS):
            return prefix
    return None


def detect_file(family: "QwenImageFamily", shapes: Mapping[str, tuple[int, ...]]) -> "Detection | None":
    from studio.engine.detect import Detection

    prefix = transformer_prefix(shapes)
    if prefix is None:
        return None
    det = Detection("checkpoint", family.label, family=family.name, prediction_type="flow",
                    prediction_source="the family (rectified flow)", native_resolution=1024,
                    components={"transformer": True, "text_encoder": False, "vae": False})
    det.standard_size = tuple(shapes[prefix + "img_in.weight"]) == (3072, 64) and tuple(
        shapes[prefix + "txt_norm.weight"]) == (3584,)
    det.notes.append("Qwen-Image transformer (diffusers layout)")
    return det


def part_kind(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Which Qwen-Image part a file holds by its keys: "text_encoder" (Qwen2.5-VL), "vae" (Wan/diffusers), or None."""
    if any(k in shapes for k in _QWEN25_MARKS) and any(k.startswith(("visual.", "model.visual.")) for k in shapes):
        return "text_encoder"
    for marks in (_WAN_VAE_MARKS, _DIFFUSERS_VAE_MARKS):
        if all(k in shapes for k in marks) and len(shapes[marks[0]]) == 5:  # causal 3-D convolutions
            return "vae"
    return None


def _kind_of(file: Path) -> str | None:
    from studio.engine.safe_load import open_weights

    try:
        return part_kind(open_weights(file).shapes)
    except Exception:  # unreadable or not a weights file: not a part
        return None


def _find(kind: str, folders: list[Path], model_file: Path) -> Path | None:
    from studio.engine.families.parts import WEIGHT_SUFFIXES

    named, others = [], []
    for folder in folders:
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
        except OSError:
            continue
        for file in files:
            if file != model_file:
                (named if any(h in file.name.lower() for h in _NAME_HINTS[kind]) else others).append(file)
    return next((f for f in named + others if _kind_of(f) == kind), None)


def find_tokenizer(path: Path, folders: list[Path], model: "ModelSection") -> Any | None:
    """Qwen2.5's tokenizer from the user's files (or the local Hugging Face cache); None when there is none."""
    from studio.engine.families import qwen_tokenizer

    return qwen_tokenizer.first_tokenizer(qwen_tokenizer.tokenizer_folders(
        path, folders, model, beside=("qwen25_tokenizer",),
        hub=(("Qwen/Qwen-Image", "tokenizer"), ("Qwen/Qwen2.5-VL-7B-Instruct", ""))))


def _chosen(model: "ModelSection", name: str, kind: str, label: str) -> Path:
    file = Path(getattr(model, name)).expanduser()
    found = _kind_of(file) if file.is_file() else None
    if found != kind:
        raise ModelLoadError(f"model.{name}: '{file}' is not {label} (its keys are not Qwen-Image's "
                             f"{'Qwen2.5-VL' if kind == 'text_encoder' else 'VAE'}); choose the "
                             f"{'qwen_2.5_vl_7b' if kind == 'text_encoder' else 'qwen_image_vae'} file")
    return file


def resolve_parts(family: "QwenImageFamily", path: Path, model: "ModelSection",
                  tokenizer: bool = True) -> dict[str, Any]:
    """The text encoder and the VAE: the file the job names (checked), else one found nearby (None: not found);
    and (``tokenizer``) Qwen2.5's tokenizer."""
    from studio.engine.families.parts import search_folders

    path = Path(path).expanduser()
    labels = {p.name: p.label for p in family.parts()}
    folders = search_folders(path)
    out: dict[str, Any] = {}
    for name in ("text_encoder", "vae"):
        out[name] = _chosen(model, name, name, labels[name]) if getattr(model, name) else _find(name, folders, path)
    if tokenizer:
        extra = [Path(v).parent for v in out.values() if v is not None]
        out["tokenizer"] = find_tokenizer(path, folders + [f for f in extra if f not in folders], model)
    return out


def part_files(family: "QwenImageFamily", path: Path, model: "ModelSection") -> dict[str, Path | None]:
    """The Model page's rows for a transformer-only file: the Qwen2.5-VL text encoder and the VAE, found or chosen."""
    from studio.engine.safe_load import open_weights

    path = Path(path).expanduser()
    if not path.is_file() or transformer_prefix(open_weights(path).shapes) is None:
        return {}
    return resolve_parts(family, path, model, tokenizer=False)


def refuse_scaled_fp8(shapes: Mapping[str, Any], name: str, field: str, plain: str) -> None:
    """ComfyUI's *_fp8_scaled files keep a scale per weight that a plain cast would drop: the model would be wrong."""
    if "scaled_fp8" in shapes or any(k.endswith((".scale_weight", ".weight_scale")) for k in shapes):
        raise ModelLoadError(f"'{name}' ({field}) is a scaled-fp8 file (ComfyUI's *_fp8_scaled), which LoRA Studio "
                             f"cannot read yet; choose the bf16 or plain fp8 file ({plain})")


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _load_into(module: Any, state: dict[str, torch.Tensor], name: str, what: str, config_dir: Path) -> Any:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"{len(missing)} weight(s) missing (e.g. {missing[0]})" if missing else (
            f"{len(unexpected)} unknown weight(s) (e.g. {unexpected[0]})")
        raise ModelLoadError(f"'{name}' does not fit the Qwen-Image {what} of '{config_dir}': {detail}; the file is "
                             "damaged or another size (set model.config_dir to a diffusers folder of this model)")
    module.load_state_dict(state, assign=True, strict=True)
    return module


def load_transformer_file(config_dir: Path, weights: "WeightsFile", name: str, dtype: torch.dtype) -> Any:
    """The transformer (fp8 storage cast to ``dtype``): the file's keys are diffusers' own."""
    from diffusers import QwenImageTransformer2DModel

    refuse_scaled_fp8(weights.shapes, name, "model.path", "qwen_image_bf16 or qwen_image_fp8_e4m3fn.safetensors")
    prefix = transformer_prefix(weights.shapes)
    state = {k.removeprefix(prefix): v for k, v in _cast(weights.tensors(), dtype).items() if k.startswith(prefix)}
    from accelerate import init_empty_weights

    config = QwenImageTransformer2DModel.load_config(config_dir, subfolder="transformer", local_files_only=True)
    with init_empty_weights():  # parameters only: the RoPE tables are computed, not loaded
        transformer = QwenImageTransformer2DModel.from_config(config)
    return _load_into(transformer, state, name, "transformer", config_dir).to(dtype)


def load_text_encoder_file(config_dir: Path, file: Path, dtype: torch.dtype) -> Any:
    """Qwen2.5-VL from one file: transformers' older layout ("model." language model, "visual.") moved to today's."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from studio.engine.safe_load import open_weights

    weights = open_weights(file)
    refuse_scaled_fp8(weights.shapes, file.name, "model.text_encoder", "qwen_2.5_vl_7b.safetensors")
    state = {}
    for key, value in _cast(weights.tensors(), dtype).items():
        if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            key = "model.language_model." + key.removeprefix("model.")
        elif key.startswith("visual."):
            key = "model." + key
        state[key] = value
    config = AutoConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    encoder, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                                       output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or unexpected:
        detail = f"{len(missing)} weight(s) missing (e.g. {missing[0]})" if missing else (
            f"{len(unexpected)} unknown weight(s) (e.g. {unexpected[0]})")
        raise ModelLoadError(f"'{file.name}' is not a complete Qwen2.5-VL text encoder for this model: {detail}; choose "
                             "the qwen_2.5_vl_7b file (model.text_encoder), or set model.config_dir for other sizes")
    check_complete(encoder, "Qwen2.5-VL text encoder", file.name)
    return encoder.eval()


def load_vae_file(config_dir: Path, file: Path) -> Any:
    """AutoencoderKLQwenImage from Wan 2.1's original layout (diffusers' Wan converter) or diffusers', in fp32."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from studio.engine.safe_load import open_weights

    weights = open_weights(file)
    state = _cast(weights.tensors(), torch.float32)
    if all(k in state for k in _WAN_VAE_MARKS):
        state = convert_wan_vae_to_diffusers(state)
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(config_dir, subfolder="vae"))
    return _load_into(vae, state, file.name, "VAE", config_dir).to(torch.float32).eval()


def load_single_file(family: "QwenImageFamily", path: Path, weights: "WeightsFile", detection: "Detection",
                     model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A transformer-only Qwen-Image file plus its Qwen2.5-VL, VAE and tokenizer, each chosen or found nearby."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from studio.engine.families.parts import PartSpec, missing_message

    if model.prediction_type not in ("auto", "flow"):
        raise ModelLoadError(f"{family.label} models are trained as rectified flow, not '{model.prediction_type}'; "
                             "set model.prediction_type to 'auto'")
    if model.config_dir:
        config_dir = Path(model.config_dir).expanduser()
        if not (config_dir / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"model.config_dir '{config_dir}' is not a Qwen-Image diffusers config folder "
                                 "(no transformer/config.json)")
    elif not detection.standard_size:
        raise ModelLoadError(f"'{path.name}' has Qwen-Image's layout but unusual sizes, so the bundled configuration "
                             "does not fit; set model.config_dir to a diffusers folder with this model's configs")
    else:
        config_dir = family.bundled_config_dir()
    parts = resolve_parts(family, path, model)
    labels = {p.name: p.label for p in family.parts()}
    specs = [PartSpec("text_encoder", labels["text_encoder"], "qwen2.5-vl"), PartSpec("vae", labels["vae"], "vae"),
             PartSpec("tokenizer", TOKENIZER_HINT, "tokenizer")]
    missing = [spec for spec in specs if parts[spec.name] is None]
    if missing:
        raise ModelLoadError(missing_message(family.label, path, missing, "qwen_2.5_vl_7b.safetensors, "
                                             "qwen_image_vae.safetensors and Qwen2.5's tokenizer folder"))
    transformer = load_transformer_file(config_dir, weights, path.name, dtype)
    text_encoder = load_text_encoder_file(config_dir, parts["text_encoder"], dtype)
    vae = load_vae_file(config_dir, parts["vae"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae,
                       text_encoders=[text_encoder], tokenizers=[parts["tokenizer"]], noise_scheduler=scheduler,
                       source=str(path), extra={"format": weights.format, "detection": detection,
                                                "parts": {k: str(parts[k]) for k in ("text_encoder", "vae")}})
