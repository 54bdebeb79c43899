"""Z-Image files as people keep them: diffusers folders (ZImagePipeline layout: transformer, text_encoder (Qwen3),
tokenizer, vae, scheduler) and ComfyUI's separate files (transformer, qwen_3_4b, ae), loaded offline into the dtype.

Qwen3's tokenizer is not bundled (151 k BPE tokens, Qwen's own files): it comes from the folder's ``tokenizer``, or,
for single files, from a tokenizer folder beside them, ComfyUI's own copy, or the local Hugging Face cache.
parts.py finds and checks the VAE (and gives the folders); Qwen3, which parts.py does not know, is told by its keys here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.families.base import ModelBundle
from studio.engine.families.loading import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, weights_variant
from studio.engine.safe_load import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.detect import Detection
    from studio.engine.families.zimage import ZImageFamily
    from studio.engine.safe_load import WeightsFile

FOLDER_PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")

# The chat template Qwen3's tokenizer applies (with enable_thinking=True it adds no <think> block): used by the
# tiny tokenizer built in code; real folders ship their own tokenizer with Qwen3's full template.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _check_prediction(family: "ZImageFamily", model: "ModelSection") -> None:
    if model.prediction_type not in ("auto", "flow"):
        raise ModelLoadError(f"{family.label} models are trained as rectified flow, not '{model.prediction_type}'; "
                             "set model.prediction_type to 'auto'")


def load_tokenizer(folder: Path, what: str) -> Any:
    """Qwen3's tokenizer from a ``tokenizer`` folder, with the chat template the pipeline applies."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: the Qwen3 tokenizer in '{folder}' cannot be read ({exc}); it needs "
                             "tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{what}: the tokenizer in '{folder}' has no chat template (Z-Image wraps every caption in "
                             "Qwen3's); use the tokenizer folder of the Z-Image download")
    return tokenizer


def load_folder(family: "ZImageFamily", path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A Z-Image diffusers folder, every part offline; the VAE stays fp32 (as the other flow families' do)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    _check_prediction(family, model)
    missing = [sub for sub in FOLDER_PARTS if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"'{path.name}' is a Z-Image folder without its {', '.join(repr(m) for m in missing)} "
                             "folder(s); the download may be incomplete")
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
            variant=weights_variant(path / "transformer", DIFFUSERS_WEIGHTS))
        check_complete(transformer, "transformer", path.name)
        text_encoder = Qwen3Model.from_pretrained(
            path / "text_encoder", dtype=dtype, local_files_only=True,
            variant=weights_variant(path / "text_encoder", TRANSFORMERS_WEIGHTS))
        check_complete(text_encoder, "Qwen3 text encoder", path.name)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True,
                                            variant=weights_variant(path / "vae", DIFFUSERS_WEIGHTS))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{path}' looks like a Z-Image folder but a part could not be read: {exc}") from exc
    tokenizer = load_tokenizer(path / "tokenizer", f"'{path.name}'")
    if model.vae:
        vae = load_vae_file(family, Path(model.vae).expanduser())
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae,
                       text_encoders=[text_encoder], tokenizers=[tokenizer], noise_scheduler=scheduler,
                       source=str(path), extra={"format": "diffusers"})


def load_vae_file(family: "ZImageFamily", path: Path) -> Any:
    """FLUX.1's 16-channel VAE ("ae.safetensors", BFL or diffusers layout) through the bundled config, in fp32."""
    return vae_from_file(family.bundled_config_dir(), path)


# ------------------------------------------------------------------------------------------------ single files
# ComfyUI's Z-Image files: the transformer alone (z_image_turbo_bf16.safetensors, the original key layout with fused
# attention.qkv, sometimes under "model.diffusion_model."; or diffusers' layout), Qwen3-4B (qwen_3_4b.safetensors,
# "model."-prefixed Qwen3 keys) and FLUX.1's "ae" VAE, each found beside the model or in models/text_encoders, vae.

_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_ORIGINAL_MARK = "layers.0.attention.qkv.weight"
_DIFFUSERS_MARK = "layers.0.attention.to_q.weight"
_QWEN_MARK = "layers.0.self_attn.q_norm.weight"  # Qwen3 (not Qwen2.5): per-head q/k norms
_TE_NAME_HINTS = ("qwen", "text_encoder")
_VAE_NAME_HINTS = ("ae.", "ae_", "vae", "flux_vae", "flux-vae")
TOKENIZER_HINT = ("Qwen3's tokenizer (a 'tokenizer' folder with tokenizer.json, e.g. the one of the Z-Image-Turbo "
                  "download, or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")


def transformer_layout(shapes: Mapping[str, Any]) -> tuple[str, str] | None:
    """("original" | "diffusers", key prefix) of a file holding a Z-Image transformer, else None."""
    for prefix in _PREFIXES:
        # Lumina 2 shares the block names; its adaLN is (SiLU, Linear): "adaLN_modulation.1", Z-Image's a bare Linear.
        if not all(prefix + k in shapes for k in ("cap_embedder.1.weight", "noise_refiner.0.attention_norm1.weight",
                                                   "layers.0.adaLN_modulation.0.weight")):
            continue
        if prefix + _ORIGINAL_MARK in shapes:
            return "original", prefix
        if prefix + _DIFFUSERS_MARK in shapes:
            return "diffusers", prefix
    return None


def detect_zimage_file(family: "ZImageFamily", shapes: Mapping[str, tuple[int, ...]]) -> "Detection | None":
    """A Detection when the file holds a Z-Image transformer (original or diffusers layout); None otherwise."""
    from studio.engine.detect import Detection

    found = transformer_layout(shapes)
    if found is None:
        return None
    layout, prefix = found
    det = Detection("checkpoint", family.label, family=family.name, prediction_type="flow",
                    prediction_source="the family (rectified flow)", native_resolution=1024,
                    components={"transformer": True, "text_encoder": False, "vae": False})
    width = shapes.get(prefix + "cap_embedder.1.weight")
    det.standard_size = bool(width) and tuple(width) == (3840, 2560)
    det.notes.append(f"{layout}-layout Z-Image transformer")
    return det


def is_qwen3(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether a file holds a Qwen3 language model (per-head q/k norms: not Qwen2.5), e.g. ComfyUI's qwen_3_4b."""
    return any(k.endswith(_QWEN_MARK) for k in shapes) and not any(k.endswith("encoder.layers.0.self_attn.q_proj.weight")
                                                                   for k in shapes)


def check_text_encoder(file: Path, config_dir: Path) -> None:
    """A ModelLoadError naming the file and model.text_encoder unless it holds this model's Qwen3 (by its width)."""
    from studio.engine.jsonfile import JsonFileError, read_json_object
    from studio.engine.safe_load import open_weights

    file = Path(file).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"'{file}' (model.text_encoder) does not exist; choose the Qwen3-4B text encoder file "
                             "(qwen_3_4b.safetensors), or clear the field to find it next to the model")
    shapes = open_weights(file).shapes
    try:
        width = int(read_json_object(config_dir / "text_encoder" / "config.json").get("hidden_size", 0))
    except (JsonFileError, TypeError, ValueError):
        width = 0
    embed = next((shapes[k] for k in shapes if k.endswith("embed_tokens.weight")), None)
    if not is_qwen3(shapes) or (width and embed is not None and embed[-1] != width):
        what = "a Qwen3 model of another size" if is_qwen3(shapes) else "no Qwen3 text encoder"
        raise ModelLoadError(f"'{file.name}' (model.text_encoder) holds {what}, not Z-Image's text encoder (Qwen3-4B"
                             f"{f', width {width}' if width else ''}); choose qwen_3_4b.safetensors, or clear the field "
                             "to find it next to the model")


def _find_text_encoder(folders: list[Path], config_dir: Path, model_file: Path) -> Path | None:
    from studio.engine.families.parts import WEIGHT_SUFFIXES

    named, others = [], []
    for folder in folders:
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
        except OSError:
            continue
        for file in files:
            if file != model_file:
                (named if any(h in file.name.lower() for h in _TE_NAME_HINTS) else others).append(file)
    for file in named + others:
        try:
            check_text_encoder(file, config_dir)
        except Exception:  # another part, a whole model or an unreadable file: the next candidate may be the one
            continue
        return file
    return None


def find_tokenizer(path: Path, folders: list[Path], model: "ModelSection") -> Any | None:
    """Qwen3's tokenizer from the user's files (or the local Hugging Face cache), with the Z-Image chat template."""
    from studio.engine.families import qwen_tokenizer

    tokenizer = qwen_tokenizer.first_tokenizer(qwen_tokenizer.tokenizer_folders(
        path, folders, model, beside=("qwen_3_4b_tokenizer",),
        hub=(("Tongyi-MAI/Z-Image-Turbo", "tokenizer"), ("Tongyi-MAI/Z-Image", "tokenizer"), ("Qwen/Qwen3-4B", ""))))
    if tokenizer is not None:
        # Qwen3's own template gives exactly this for one user turn with enable_thinking=True; ComfyUI's Qwen2.5
        # tokenizer has another (system prompt), so the one Z-Image was trained with is set.
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config_dir(family: "ZImageFamily", model: "ModelSection") -> Path:
    return Path(model.config_dir).expanduser() if model.config_dir else family.bundled_config_dir()


def vae_spec(family: "ZImageFamily", config_dir: Path) -> Any:
    from studio.engine.families.parts import spec_from_config

    label = next(p.label for p in family.parts() if p.name == "vae")
    # FLUX.1's "ae" and SD3's VAE share their shapes: only files named for it (or in the model's own vae/ folder).
    return spec_from_config("vae", label, "vae", config_dir, hints=_VAE_NAME_HINTS, hints_only=True)


def resolve_parts(family: "ZImageFamily", path: Path, model: "ModelSection", tokenizer: bool = True) -> dict[str, Any]:
    """The Qwen3 text encoder and the VAE: the file the job names (checked), else one found nearby (None: not found);
    and (``tokenizer``) Qwen3's tokenizer."""
    from studio.engine.families.parts import resolve, search_folders

    path = Path(path).expanduser()
    config_dir = _config_dir(family, model)
    folders = search_folders(path)
    out: dict[str, Any] = {}
    if model.text_encoder:
        check_text_encoder(Path(model.text_encoder), config_dir)
        out["text_encoder"] = Path(model.text_encoder).expanduser()
    else:
        out["text_encoder"] = _find_text_encoder(folders, config_dir, path)
    out.update(resolve([vae_spec(family, config_dir)], path, {"vae": model.vae}, {}))
    if tokenizer:
        extra = [Path(v).parent for v in out.values() if v is not None]
        out["tokenizer"] = find_tokenizer(path, folders + [f for f in extra if f not in folders], model)
    return out


def part_files(family: "ZImageFamily", path: Path, model: "ModelSection") -> dict[str, Path | None]:
    """The Model page's rows for a transformer-only file: the Qwen3 text encoder and the VAE, found or chosen."""
    from studio.engine.safe_load import open_weights

    path = Path(path).expanduser()
    if not path.is_file() or transformer_layout(open_weights(path).shapes) is None:
        return {}
    return resolve_parts(family, path, model, tokenizer=False)


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
            if k.startswith(prefix)}


def load_transformer_file(config_dir: Path, weights: "WeightsFile", name: str, dtype: torch.dtype) -> Any:
    """The transformer from either layout (fp8 storage cast to ``dtype``), through diffusers' own converter."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    layout, prefix = transformer_layout(weights.shapes)
    state = _strip(weights.tensors(), prefix, dtype)
    if layout == "original":  # fused qkv, out, q/k norms and the patch-size-keyed embedder/final layer renamed
        state = convert_z_image_transformer_checkpoint_to_diffusers(state)
    config = ZImageTransformer2DModel.load_config(config_dir, subfolder="transformer", local_files_only=True)
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(config)
    expected = set(transformer.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"{len(missing)} weight(s) missing (e.g. {missing[0]})" if missing else (
            f"{len(unexpected)} unknown weight(s) (e.g. {unexpected[0]})")
        raise ModelLoadError(f"'{name}' does not fit the Z-Image transformer of '{config_dir}': {what}; the file is "
                             "damaged or another size (set model.config_dir to a diffusers folder of this model)")
    transformer.load_state_dict(state, assign=True, strict=True)
    return transformer.to(dtype)


def load_text_encoder_file(config_dir: Path, file: Path, dtype: torch.dtype) -> Any:
    """Qwen3 from a single file (ComfyUI's "model."-prefixed keys or bare ones; an LM head is dropped)."""
    from transformers import AutoConfig, Qwen3Model

    from studio.engine.safe_load import open_weights

    config = AutoConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    state = {k.removeprefix("model."): (v.to(dtype) if v.is_floating_point() else v)
             for k, v in open_weights(file).tensors().items() if not k.startswith("lm_head.")}
    encoder, info = Qwen3Model.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                               output_loading_info=True)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(f"'{file.name}' is not a complete Qwen3 text encoder for this model: {len(missing)} "
                             f"weight(s) missing (e.g. {missing[0]}); choose the qwen_3_4b file (model.text_encoder)")
    check_complete(encoder, "Qwen3 text encoder", file.name)
    return encoder


def load_single_file(family: "ZImageFamily", path: Path, weights: "WeightsFile", detection: "Detection",
                     model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A transformer-only Z-Image file plus its Qwen3 text encoder, VAE and tokenizer, each chosen or found nearby."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _check_prediction(family, model)
    if model.config_dir:
        config_dir = Path(model.config_dir).expanduser()
        if not (config_dir / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"model.config_dir '{config_dir}' is not a Z-Image diffusers config folder "
                                 "(no transformer/config.json)")
    elif not detection.standard_size:
        raise ModelLoadError(f"'{path.name}' has Z-Image's layout but unusual sizes, so the bundled configuration does "
                             "not fit; set model.config_dir to a diffusers folder with this model's configs")
    else:
        config_dir = family.bundled_config_dir()
    from studio.engine.families.parts import PartSpec, missing_message

    parts = resolve_parts(family, path, model)
    labels = {p.name: p.label for p in family.parts()}
    specs = [PartSpec("text_encoder", labels["text_encoder"], "qwen3"), vae_spec(family, config_dir),
             PartSpec("tokenizer", TOKENIZER_HINT, "tokenizer")]
    missing = [spec for spec in specs if parts[spec.name] is None]
    if missing:
        raise ModelLoadError(missing_message(family.label, path, missing,
                                             "qwen_3_4b.safetensors, ae.safetensors and Qwen3's tokenizer folder"))
    transformer = load_transformer_file(config_dir, weights, path.name, dtype)
    text_encoder = load_text_encoder_file(config_dir, parts["text_encoder"], dtype)
    vae = vae_from_file(config_dir, parts["vae"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae,
                       text_encoders=[text_encoder], tokenizers=[parts["tokenizer"]], noise_scheduler=scheduler,
                       source=str(path), extra={"format": weights.format, "detection": detection,
                                                "parts": {k: str(parts[k]) for k in ("text_encoder", "vae")}})


def vae_from_file(config_dir: Path, file: Path) -> Any:
    """The VAE from a single file (BFL \"ae\" or diffusers layout) through a config folder, in fp32."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_single_file(str(file), config=str(config_dir), subfolder="vae", torch_dtype=torch.float32,
                                         local_files_only=True)
    check_complete(vae, "VAE", file.name)
    return vae
