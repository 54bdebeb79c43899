"""FLUX.1 files as people keep them: diffusers folders, a transformer-only single file (BFL or diffusers layout, often
fp8) plus separate CLIP-L, T5-XXL and "ae" VAE files, found beside it or in ComfyUI/A1111 model folders (parts.py),
and ComfyUI's all-in-one checkpoints, whose own ``text_encoders.clip_l/t5xxl.`` and ``vae.`` parts are used.

Single files load through diffusers' own single-file converters with the bundled configs (offline). T5's
tokenizer cannot be bundled here (the app does not ship a copy), so it is taken from the user's files: a
``spiece.model`` or T5 ``tokenizer.json`` (a ``tokenizer_2`` folder of a FLUX diffusers folder has both), or the
local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.detect import Detection
from studio.engine.families.base import ModelBundle
from studio.engine.families.loading import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, weights_variant
from studio.engine.families.parts import (
    PartSpec, comfyui_t5_tokenizer, holding, missing_message, resolve, search_folders, spec_from_config,
)
from studio.engine.families.parts import find_t5_tokenizer as _find_t5_tokenizer
from studio.engine.safe_load import ModelLoadError, open_weights

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.families.flux import FluxFamily
    from studio.engine.safe_load import WeightsFile

# The tiny models' schedules, as the real ones: dev shifts by resolution (from the token count), schnell not at all.
_SCHEDULE = {"num_train_timesteps": 1000, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}
SCHEDULER_CONFIGS = {"dev": {**_SCHEDULE, "shift": 3.0, "use_dynamic_shifting": True},
                     "schnell": {**_SCHEDULE, "shift": 1.0, "use_dynamic_shifting": False}}

# Key marks of a FLUX.1 transformer, in the BFL layout (possibly under ComfyUI's "model.diffusion_model.") and in
# diffusers' layout; the guidance embedder is what tells [dev] from [schnell].
_BFL_MARK = "double_blocks.0.img_attn.qkv.weight"
_BFL_GUIDANCE = "guidance_in.in_layer.weight"
_DIFFUSERS_MARK = "single_transformer_blocks.0.proj_mlp.weight"
_DIFFUSERS_GUIDANCE = "time_text_embed.guidance_embedder.linear_1.weight"
_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
def _find(shapes: Mapping[str, Any], key: str) -> str | None:
    for prefix in _PREFIXES:
        if prefix + key in shapes:
            return prefix
    return None


def transformer_layout(shapes: Mapping[str, Any]) -> tuple[str, str, bool] | None:
    """("bfl" | "diffusers", key prefix, has guidance) of a file holding a FLUX.1 transformer, else None."""
    prefix = _find(shapes, _BFL_MARK)
    if prefix is not None and not any(k.startswith(prefix + "distilled_guidance_layer.") for k in shapes):  # Chroma
        return "bfl", prefix, prefix + _BFL_GUIDANCE in shapes
    prefix = _find(shapes, _DIFFUSERS_MARK)
    if prefix is not None and prefix + "x_embedder.weight" in shapes:
        return "diffusers", prefix, prefix + _DIFFUSERS_GUIDANCE in shapes
    return None


def detect_flux_file(family: "FluxFamily", shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                     filename: str) -> Detection | None:
    """A Detection when the file holds a FLUX.1 transformer of ``family``'s variant (dev: with guidance_in)."""
    found = transformer_layout(shapes)
    if found is None:
        return None
    layout, prefix, guidance = found
    if guidance != family.guidance_embeds:
        return None
    components = {"transformer": True, **inside_parts(shapes)}
    det = Detection("checkpoint", family.label, family=family.name, prediction_type="flow",
                    prediction_source="the family (rectified flow)", native_resolution=1024, components=components)
    qkv = shapes.get(prefix + (_BFL_MARK if layout == "bfl" else "transformer_blocks.0.attn.to_q.weight"))
    det.standard_size = bool(qkv) and qkv[-1] == 3072
    det.notes.append(f"{layout.upper() if layout == 'bfl' else 'diffusers'}-layout transformer")
    inside = [label for name, label in (("text_encoder", "CLIP-L"), ("text_encoder_2", "T5-XXL"), ("vae", "VAE"))
              if components[name]]
    if inside:
        det.notes.append(f"carries its own {', '.join(inside)} (ComfyUI's all-in-one layout)")
    return det


# Where a ComfyUI all-in-one FLUX.1 checkpoint (comfy's supported_models.Flux: text_encoder_key_prefix
# "text_encoders.", vae_key_prefix "vae.") keeps its parts.
INSIDE_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer.",
                   "vae": "vae."}


def inside_parts(shapes: Mapping[str, Any]) -> dict[str, bool]:
    """Which parts a FLUX.1 file carries itself (all-in-one checkpoints), by their key prefixes."""
    return {name: any(k.startswith(prefix) for k in shapes) for name, prefix in INSIDE_PREFIXES.items()}


# ------------------------------------------------------------------------------------------------ loading


def _check_prediction(family: "FluxFamily", model: "ModelSection") -> None:
    if model.prediction_type not in ("auto", "flow"):
        raise ModelLoadError(f"{family.label} models are trained as rectified flow, not '{model.prediction_type}'; "
                             "set model.prediction_type to 'auto'")


def _variant(folder: Path, sub: str, weights: tuple[str, ...]) -> str | None:
    return weights_variant(folder / sub, weights)


def load_folder(family: "FluxFamily", path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A FLUX.1 diffusers folder (FluxPipeline layout), every part offline, straight into ``dtype``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    _check_prediction(family, model)
    path = Path(path)
    for sub in ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        if not (path / sub).is_dir() and not (sub == "tokenizer" or sub == "text_encoder" and model.text_encoder):
            raise ModelLoadError(f"'{path.name}' is a FLUX.1 folder without its '{sub}' folder; the download may be "
                                 "incomplete")
    transformer = FluxTransformer2DModel.from_pretrained(
        path, subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        variant=_variant(path, "transformer", DIFFUSERS_WEIGHTS))
    check_complete(transformer, "transformer", path.name)
    vae = (load_vae_file(family, Path(model.vae)) if model.vae else AutoencoderKL.from_pretrained(
        path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True,
        variant=_variant(path, "vae", DIFFUSERS_WEIGHTS)))
    clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True,
                                         variant=_variant(path, "text_encoder", TRANSFORMERS_WEIGHTS))
    t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True,
                                        variant=_variant(path, "text_encoder_2", TRANSFORMERS_WEIGHTS))
    tokenizer = (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
                 if (path / "tokenizer").is_dir() else _clip_tokenizer())
    tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae,
                       text_encoders=[clip, t5], tokenizers=[tokenizer, tokenizer_2], noise_scheduler=scheduler,
                       source=str(path))


def _clip_tokenizer() -> Any:
    from studio.engine.tokenizers import load_tokenizer

    return load_tokenizer("clip-l")


def load_vae_file(family: "FluxFamily", path: Path, config_dir: Path | None = None) -> Any:
    """The 16-channel VAE from a single file ("ae.safetensors", BFL or diffusers layout), through the bundled config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_single_file(str(path), config=str(config_dir or family.bundled_config_dir()),
                                          subfolder="vae", torch_dtype=torch.float32, local_files_only=True)


def _inside(w: "WeightsFile", prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of an all-in-one file, with ``new_prefix`` in its place."""
    return {new_prefix + k[len(prefix):]: v for k, v in w.tensors([k for k in w.shapes if k.startswith(prefix)]).items()}


def load_single_file(family: "FluxFamily", path: Path, weights: "WeightsFile", detection: Detection,
                     model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    """A transformer-only (or all-in-one) FLUX.1 file plus the parts it lacks, each a file the job names, the file's
    own (ComfyUI's all-in-one checkpoints) or one found beside it / in the usual model folders; the message names
    every part still missing."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    _check_prediction(family, model)
    config_dir = Path(model.config_dir).expanduser() if model.config_dir else family.bundled_config_dir()
    parts = resolve_parts(family, path, model)
    missing = [spec for spec in part_specs(family, config_dir) if spec.name in parts and parts[spec.name] is None]
    if parts.get("tokenizer_2") is None:
        missing.append(T5_TOKENIZER_SPEC)
    if missing:
        raise ModelLoadError(missing_parts_message(family, path, missing))
    # diffusers converts the BFL layout (and casts fp8 storage to ``dtype``) with the bundled config, offline; an
    # all-in-one file's transformer is handed over alone (its other parts load below).
    source: Any = str(path)
    if any(name not in parts for name in INSIDE_PREFIXES):
        _, prefix, _ = transformer_layout(weights.shapes) or ("", "", False)
        source = {k[len(prefix):]: v for k, v in weights.tensors(
            [k for k in weights.shapes if k.startswith(prefix) and not k.startswith(("text_encoders.", "vae."))]).items()}
    transformer = FluxTransformer2DModel.from_single_file(source, config=str(config_dir), subfolder="transformer",
                                                          torch_dtype=dtype, local_files_only=True)
    check_complete(transformer, "transformer", path.name)
    encoders = []
    for sub in ("text_encoder", "text_encoder_2"):
        if sub in parts:
            encoders.append(load_text_encoder(config_dir, sub, parts[sub], dtype))
        else:
            encoders.append(load_text_encoder(config_dir, sub, path, dtype, prefix=INSIDE_PREFIXES[sub]))
    if "vae" in parts:
        vae = load_vae_file(family, parts["vae"], config_dir)
    else:  # ComfyUI's "vae." keys are the LDM names diffusers' converter reads under "first_stage_model."
        vae = AutoencoderKL.from_single_file(_inside(weights, "vae.", "first_stage_model."), config=str(config_dir),
                                             subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        check_complete(vae, "VAE", path.name)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)
    found = {k: str(v) if k in parts else "inside" for k, v in
             (("text_encoder", parts.get("text_encoder")), ("text_encoder_2", parts.get("text_encoder_2")),
              ("vae", parts.get("vae")))}
    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=vae, text_encoders=encoders,
                       tokenizers=[_clip_tokenizer(), parts["tokenizer_2"]], noise_scheduler=scheduler,
                       source=str(path), extra={"parts": found})


def load_text_encoder(config_dir: Path, sub: str, file: Path, dtype: torch.dtype, prefix: str | None = None) -> Any:
    """CLIP-L or T5-XXL from a single file (transformers layout, possibly under a prefix; fp8 is cast): a part file
    (its prefix told by its keys) or an all-in-one file's (``prefix``)."""
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    cls = CLIPTextModel if sub == "text_encoder" else T5EncoderModel
    config = AutoConfig.from_pretrained(config_dir / sub, local_files_only=True)
    w = open_weights(file)
    if prefix is None:
        found = holding(w.shapes)
        prefix = found.prefix if found is not None else ""
    state = {}
    for key, value in w.tensors([k for k in w.shapes if k.startswith(prefix)]).items():
        state[key[len(prefix):]] = value.to(dtype) if value.is_floating_point() else value
    if cls is CLIPTextModel:
        # Files say "text_model.…"; transformers >= 5.6 dropped that level from CLIPTextModel's own names.
        with torch.device("meta"):
            nested = any(k.startswith("text_model.") for k in cls(config).state_dict())
        state = {("text_model." if nested else "") + k.removeprefix("text_model."): v for k, v in state.items()}
    if cls is T5EncoderModel and "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]  # tied in T5; files keep one of them
    # transformers builds the model from the config and this state dict (buffers, tied weights and all).
    encoder, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    what = "CLIP-L text encoder" if cls is CLIPTextModel else "T5-XXL text encoder"
    # transformers fills missing weights with random ones; a part file missing some is damaged or another model.
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ModelLoadError(f"'{file.name}' is not a complete {what}: {len(missing)} weight(s) missing "
                             f"(e.g. {sorted(missing)[0]}); choose the {what} file (model.{sub})")
    check_complete(encoder, what, file.name)
    return encoder


# -------------------------------------------------------------------------------------------- the parts


# A name only: the T5 tokenizer is not a weights file (and is looked for beside the T5 file or in the HF cache).
T5_TOKENIZER_SPEC = PartSpec("tokenizer_2", "T5 tokenizer (spiece.model or T5 tokenizer.json)", "tokenizer")


def part_specs(family: "FluxFamily", config_dir: Path) -> list[PartSpec]:
    """The parts a transformer-only file needs, with the sizes the config folder gives (CLIP-L and T5 are told apart
    by them, and from SD's or SD3's encoders)."""
    labels = {p.name: p.label for p in family.parts()}
    return [
        spec_from_config("text_encoder", labels["text_encoder"], "clip", config_dir,
                         hints=("clip_l", "clip-l", "clip_vit_l", "vit-l")),
        spec_from_config("text_encoder_2", labels["text_encoder_2"], "t5", config_dir,
                         hints=("t5xxl", "t5-xxl", "t5_xxl", "t5-v1_1-xxl")),
        # Flux's "ae" and SD3's VAE share their shapes: only files named for it (or in the model's own vae/ folder).
        spec_from_config("vae", labels["vae"], "vae", config_dir, hints=("ae.", "flux_vae", "flux-vae", "ae_", "vae"),
                         hints_only=True),
    ]


def missing_parts_message(family: "FluxFamily", path: Path, missing: list[PartSpec]) -> str:
    return missing_message(family.label, path, missing,
                           "clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors and T5's spiece.model")


def find_t5_tokenizer(folders: list[Path]) -> Any | None:
    """T5's tokenizer from the user's files (spiece.model / tokenizer.json, or a tokenizer_2 folder), or the HF cache."""
    return _find_t5_tokenizer(folders, ("tokenizer_2", "t5_tokenizer", "t5xxl"), (
        ("black-forest-labs/FLUX.1-dev", "tokenizer_2"), ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
        ("google/t5-v1_1-xxl", "")))


def resolve_parts(family: "FluxFamily", path: Path, model: "ModelSection") -> dict[str, Any]:
    """Each part the file lacks: the file the job names (checked by its shapes), else one found nearby (None: not
    found); parts the file carries itself (all-in-one) are left out unless the job names a file for them."""
    path = Path(path).expanduser()
    config_dir = Path(model.config_dir).expanduser() if model.config_dir else family.bundled_config_dir()
    chosen = {"text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2, "vae": model.vae}
    out: dict[str, Any] = resolve(part_specs(family, config_dir), path, chosen,
                                  inside_parts(open_weights(path).shapes))
    folders = search_folders(path)
    extra = [Path(v).parent for v in out.values() if v is not None] + comfyui_t5_tokenizer(path)
    out["tokenizer_2"] = find_t5_tokenizer(folders + [f for f in extra if f not in folders])
    return out
