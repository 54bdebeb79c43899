"""Load SD3.x models offline: diffusers folders, and Stability's single files (with or without text encoders inside).

Single files name the parts by prefix (``model.diffusion_model.``, ``first_stage_model.``,
``text_encoders.clip_l/clip_g/t5xxl.``); diffusers' own single-file converters turn each into its diffusers
module through a bundled config folder, offline. The common SD3.5 download holds the MMDiT (and VAE) without the
text encoders, which come as clip_l / clip_g / t5xxl files: those are found beside it (Stability's text_encoders/
folder) or in ComfyUI/A1111's folders, or named in the job, told apart by their shapes (parts.py), and put into the
all-in-one layout, so they load exactly as an all-in-one file's. T5-XXL is optional: a model without it (or
without T5's tokenizer, which is not bundled) trains with zeros in its place, as StableDiffusion3Pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from studio.engine.families.base import ModelBundle
from studio.engine.families.parts import (
    PartSpec, comfyui_t5_tokenizer, find_t5_tokenizer, holding, missing_message, resolve, spec_from_config,
)
from studio.engine.families.loading import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, check_complete, weights_variant
from studio.engine.safe_load import ModelLoadError, WeightsFile, open_weights, read_safetensors_header

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import ModelSection
    from studio.engine.detect import Detection
    from studio.engine.families.sd3 import SD3Family

_PREDICTION_SOURCE = "the family (SD3 models are rectified-flow models)"
T5_TOKENIZER_HINT = ("a 'tokenizer_3' folder with T5's tokenizer (tokenizer.json or spiece.model, as in "
                     "stabilityai/stable-diffusion-3.5-large's tokenizer_3/; ComfyUI's comfy/text_encoders/t5_tokenizer "
                     "is found by itself)")


# ------------------------------------------------------------------------------------------------ detection


def detect_sd3_file(family: "SD3Family", shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                    filename: str) -> "Detection | None":
    """A Detection if the file holds an MMDiT of ``family``'s kind (told by q/k norm and the second attention)."""
    from studio.engine.detect import Detection, has_prefix

    keys = list(shapes)
    if has_prefix(keys, "model.diffusion_model.joint_blocks."):
        prefix = "model.diffusion_model."
    elif has_prefix(keys, "joint_blocks."):
        prefix = ""  # a transformer-only file (ComfyUI's diffusion_models/ folder)
    else:
        return None
    qk_norm = f"{prefix}joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    dual = any(".x_block.attn2." in k for k in keys)
    if not family.variant_matches(qk_norm, dual):
        return None
    blocks = {int(k[len(prefix):].split(".")[1]) for k in keys if k.startswith(prefix + "joint_blocks.")}
    embed = shapes.get(prefix + "x_embedder.proj.weight")
    width = embed[0] if embed else None
    components = {"transformer": True, "vae": has_prefix(keys, "first_stage_model."),
                  "text_encoder": has_prefix(keys, "text_encoders.clip_l."),
                  "text_encoder_2": has_prefix(keys, "text_encoders.clip_g."),
                  "text_encoder_3": has_prefix(keys, "text_encoders.t5xxl.")}
    det = Detection("checkpoint", family.label, family=family.name, prediction_type="flow",
                    prediction_source=_PREDICTION_SOURCE, components=components,
                    in_channels=embed[1] if embed and len(embed) == 4 else None)
    det.native_resolution = family.native_resolution()
    det.standard_size = (len(blocks), width) == (family._depth, family._width)
    lacks = [label for name, label in (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"), ("vae", "VAE"))
             if not components[name]]
    if lacks:
        det.notes.append(f"no {', '.join(lacks)} inside: loads with the part files found beside it (a text_encoders/ "
                         "folder) or in ComfyUI/A1111's model folders, or chosen on the Model page")
    if not components["text_encoder_3"]:
        det.notes.append("no T5-XXL inside: a t5xxl file found or chosen is used, else zeros in its place (as SD3 allows)")
    return det


# ------------------------------------------------------------------------------------------------ parts

# Where each part sits in the all-in-one layout (sd3.FILE_PREFIXES), which part files are put into.
_INSIDE = {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
           "text_encoder_3": "text_encoders.t5xxl.", "vae": "first_stage_model."}
# Stability ships SD3's VAE inside the model file (or in the repository's vae/ folder beside it); Flux's "ae" has the
# same shapes but other weights, so only files named for SD3 are taken.
_VAE_HINTS = ("sd3_vae", "sd3-vae", "sd3.5_vae", "sd3.5-vae", "sd35_vae", "sd35-vae", "vae_sd3", "vae-sd3")


def part_specs(family: "SD3Family", config_dir: Path) -> list[PartSpec]:
    """CLIP-L, CLIP-G, T5-XXL (optional) and the VAE, with the sizes the config folder gives: CLIP-L (768 wide,
    12 layers) and CLIP-G (1280, 32) are told apart by them, not by their file names."""
    labels = {p.name: p.label for p in family.parts()}
    return [
        spec_from_config("text_encoder", labels["text_encoder"], "clip", config_dir,
                         hints=("clip_l", "clip-l", "clip_vit_l", "vit-l")),
        spec_from_config("text_encoder_2", labels["text_encoder_2"], "clip", config_dir,
                         hints=("clip_g", "clip-g", "bigg", "vit-g")),
        spec_from_config("text_encoder_3", labels["text_encoder_3"], "t5", config_dir,
                         hints=("t5xxl", "t5-xxl", "t5_xxl", "t5-v1_1-xxl"), required=False),
        spec_from_config("vae", labels["vae"], "vae", config_dir, hints=_VAE_HINTS, hints_only=True),
    ]


def _config_dir(family: "SD3Family", model: "ModelSection") -> Path:
    return Path(model.config_dir).expanduser() if model.config_dir else family.bundled_config_dir()


def resolve_parts(family: "SD3Family", path: Path, shapes: Mapping[str, tuple[int, ...]],
                  model: "ModelSection") -> dict[str, Path | None]:
    """The part files of a single file: each the job names (checked by its shapes) or, for a part the file lacks,
    one found nearby (None: not found). Parts the file carries and the job does not name are left out."""
    inside = {name: any(k.startswith(prefix) for k in shapes) for name, prefix in _INSIDE.items()}
    chosen = {name: getattr(model, name) for name in _INSIDE}
    return resolve(part_specs(family, _config_dir(family, model)), Path(path), chosen, inside)


def _part_tensors(name: str, file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A part file's tensors under the all-in-one file's names (``text_encoders.clip_l.transformer.text_model.…``;
    VAEs as vae_state_dict gives them), cast to ``dtype`` (fp8 T5 files too)."""
    if name == "vae":
        from studio.engine.families.sd_loading import vae_state_dict

        return vae_state_dict(file)
    w = open_weights(file)
    found = holding(w.shapes)
    prefix = found.prefix if found is not None else ""
    out = {}
    for key, value in w.tensors([k for k in w.shapes if k.startswith(prefix)]).items():
        rest = key[len(prefix):]
        if name != "text_encoder_3" and not rest.startswith(("text_model.", "text_projection.")):
            rest = "text_model." + rest  # transformers >= 5.6 saves CLIPTextModel without its text_model level
        out[_INSIDE[name] + "transformer." + rest] = value.to(dtype) if value.is_floating_point() else value
    return out


# ------------------------------------------------------------------------------------------------ pieces


def _prediction_note(model: "ModelSection") -> str | None:
    if model.prediction_type != "auto":
        return (f"model.prediction_type is {model.prediction_type}, but SD3 models are rectified-flow models; "
                "the setting is ignored")
    return None


def t5_tokenizer(folders: list[Path]) -> Any | None:
    """T5's tokenizer from the first folder that holds one (its ``tokenizer_3`` subfolder or itself), else from an
    SD3 model already in the local Hugging Face cache, else None."""
    return find_t5_tokenizer(folders, ("tokenizer_3",), tuple(
        (repo, "tokenizer_3") for repo in ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
                                           "stabilityai/stable-diffusion-3-medium-diffusers")))


def _clip_tokenizers(folder: Path | None) -> list[Any]:
    from transformers import CLIPTokenizer

    from studio.engine.tokenizers import load_tokenizer

    out = []
    for sub, bundled in (("tokenizer", "clip-l"), ("tokenizer_2", "clip-g")):
        own = folder / sub if folder is not None else None
        out.append(CLIPTokenizer.from_pretrained(own, local_files_only=True)
                   if own is not None and (own / "vocab.json").is_file() else load_tokenizer(bundled))
    return out


def _scheduler(config_dir: Path) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler", local_files_only=True)


def _t5_wanted(folder: Path) -> bool:
    """Whether a diffusers folder ships T5 (model_index may list it as null: the 'no T5' variant)."""
    from studio.engine.jsonfile import JsonFileError, read_json_object

    try:
        index = read_json_object(folder / "model_index.json", what="the model index")
    except JsonFileError:
        index = {}
    entry = index.get("text_encoder_3")
    return (folder / "text_encoder_3").is_dir() and not (isinstance(entry, list) and entry[:1] == [None])


# ------------------------------------------------------------------------------------------------ folders


def load_folder(family: "SD3Family", path: Path, model: "ModelSection", dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    for part in ("transformer", "vae", *family.text_encoder_names):
        for weights in sorted((path / part).glob("*.safetensors")) if (path / part).is_dir() else []:
            read_safetensors_header(weights)  # a damaged or renamed file gets our sentence, not SafetensorError's
    kw = {"local_files_only": True, "torch_dtype": dtype}
    notes = [n for n in (_prediction_note(model),) if n]
    try:
        transformer = SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer", variant=weights_variant(path / "transformer", DIFFUSERS_WEIGHTS), **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=weights_variant(path / "vae", DIFFUSERS_WEIGHTS), **kw)
        encoders = [CLIPTextModelWithProjection.from_pretrained(
            path, subfolder=sub, variant=weights_variant(path / sub, TRANSFORMERS_WEIGHTS), **kw)
            for sub in ("text_encoder", "text_encoder_2")]
        tokenizers = _clip_tokenizers(path)
        if _t5_wanted(path):
            tokenizer = t5_tokenizer([path])
            if tokenizer is None:
                raise ModelLoadError(f"'{path.name}' has T5-XXL (text_encoder_3) but no tokenizer for it; it needs "
                                     f"{T5_TOKENIZER_HINT}")
            # A frozen encoder must not drop out: the trainer puts the text encoders in train mode.
            encoders.append(T5EncoderModel.from_pretrained(
                path, subfolder="text_encoder_3", variant=weights_variant(path / "text_encoder_3", TRANSFORMERS_WEIGHTS),
                dropout_rate=0.0, **kw))
            tokenizers.append(tokenizer)
        else:
            notes.append("this folder has no T5-XXL (text_encoder_3): training uses zeros in its place")
        scheduler = _scheduler(path)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"'{path}' looks like a diffusers folder but a part could not be read: {exc}") from exc
    if model.vae:
        from studio.engine.families.sd_loading import separate_vae

        vae = separate_vae(Path(model.vae).expanduser(), path, dtype)
    extra = {"format": "diffusers", "prediction_source": _PREDICTION_SOURCE}
    if notes:
        extra["warning"] = "; ".join(notes)
    return ModelBundle(family, "flow", transformer, vae, encoders, tokenizers, scheduler, str(path), extra=extra)


# ------------------------------------------------------------------------------------------------ single files


def _tensors(w: WeightsFile, prefix: str) -> dict[str, torch.Tensor]:
    return w.tensors([k for k in w.shapes if k.startswith(prefix)])


def load_single_file(family: "SD3Family", path: Path, w: WeightsFile, det: "Detection", model: "ModelSection",
                     dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm, create_diffusers_t5_model_from_checkpoint,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    name = path.name
    if model.config_dir:
        config_dir = Path(model.config_dir).expanduser()
        if not (config_dir / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"model.config_dir '{config_dir}' is not an SD3 diffusers config folder "
                                 "(no transformer/config.json)")
    else:
        if not det.standard_size:
            raise ModelLoadError(f"'{name}' has the layout of {det.architecture} but unusual sizes, so the bundled "
                                 "configuration does not fit; set model.config_dir to a diffusers folder with this "
                                 "model's configs")
        config_dir = family.bundled_config_dir()
    # Every part is found (or refused by name) before the big transformer is read.
    parts = resolve_parts(family, path, w.shapes, model)
    missing = [spec for spec in part_specs(family, config_dir) if spec.required and spec.name in parts
               and parts[spec.name] is None]
    if missing:
        raise ModelLoadError(missing_message(family.label, path, missing,
                                             "clip_l.safetensors, clip_g.safetensors (and t5xxl_fp16.safetensors)"))
    notes = [n for n in (_prediction_note(model),) if n]
    kw = {"config": str(config_dir), "torch_dtype": dtype, "local_files_only": True}
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in w.shapes) else ""
    mmdit = {k: v for k, v in _tensors(w, prefix + "").items()
             if k.startswith(prefix) and not k.startswith(("first_stage_model.", "text_encoders."))}
    transformer = SD3Transformer2DModel.from_single_file(mmdit, subfolder="transformer", **kw)
    check_complete(transformer, "transformer", name)

    def tensors_of(part: str) -> tuple[dict[str, torch.Tensor], str]:
        """A part's tensors in the all-in-one layout and the file they come from: its part file, or this file."""
        if parts.get(part) is not None:
            return _part_tensors(part, parts[part], dtype), parts[part].name
        return _tensors(w, _INSIDE[part]), name

    vae_sd, vae_name = tensors_of("vae")
    vae = AutoencoderKL.from_single_file(vae_sd, subfolder="vae", **kw)
    check_complete(vae, "VAE", vae_name)

    encoders = []
    for sub, what in (("text_encoder", "CLIP-L text encoder"), ("text_encoder_2", "CLIP-G text encoder")):
        state, source = tensors_of(sub)
        encoder = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state, subfolder=sub, **kw)
        check_complete(encoder, what, source)
        encoders.append(encoder)
    tokenizers = _clip_tokenizers(config_dir if model.config_dir else None)
    if det.components.get("text_encoder_3") or parts.get("text_encoder_3") is not None:
        t5_file = parts.get("text_encoder_3")
        tokenizer = t5_tokenizer([p for p in (config_dir if model.config_dir else None, path.parent,
                                              t5_file.parent if t5_file is not None else None) if p is not None]
                                 + comfyui_t5_tokenizer(path))
        t5_name = t5_file.name if t5_file is not None else name
        if tokenizer is None:
            notes.append(f"'{t5_name}' holds T5-XXL but its tokenizer is not bundled; put {T5_TOKENIZER_HINT} next "
                         "to the file (or in model.config_dir) to use it. Training uses zeros in its place now")
        else:
            state, source = tensors_of("text_encoder_3")
            t5 = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, state, subfolder="text_encoder_3", **kw)
            if t5.encoder.embed_tokens.weight.device.type == "meta":
                t5.set_input_embeddings(t5.shared)  # tied to `shared`; files hold the embedding once
            check_complete(t5, "T5-XXL text encoder", source)
            t5.config.dropout_rate = 0.0
            for module in t5.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0  # a frozen encoder must not drop out in the trainer's train mode
            encoders.append(t5)
            tokenizers.append(tokenizer)
    extra = {"format": w.format, "detection": det, "config_dir": str(config_dir), "prediction_source": _PREDICTION_SOURCE,
             "parts": {k: str(v) if v is not None else None for k, v in parts.items()}}
    if model.family != "auto" and det.family and model.family != det.family:
        notes.append(f"model.family is {model.family} but the weights look like {det.architecture}")
    if notes:
        extra["warning"] = "; ".join(notes)
    return ModelBundle(family, "flow", transformer, vae, encoders, tokenizers, _scheduler(config_dir), str(path),
                       extra=extra)
