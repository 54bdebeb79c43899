"""Bake a kohya-format LoRA into a base model and save one single-file checkpoint that A1111/ComfyUI load; conversions."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from studio.engine import families
from studio.engine.adapters import AdapterFileError, FileModule, read_modules
from studio.engine.config import ModelSection
from studio.engine.detect import detect
from studio.engine.families import ModelBundle
from studio.engine.families import lora_family as lora_family_of
from studio.engine.ldm import save_safetensors
from studio.engine.safe_load import ModelLoadError, open_weights


@functools.cache
def _kohya_name() -> re.Pattern:
    """Module names of a kohya/LyCORIS-layout file of any registered family: ``<prefix>_<module>``."""
    prefixes = "|".join(re.escape(p) for p in sorted(families.kohya_prefixes(), key=len, reverse=True))
    return re.compile(rf"^(?:{prefixes})_[^.]+$")


# The adapter type of each module (LoRA, LoCon, DoRA, LoHa, LoKr) computes its own weight change.
KohyaModule = FileModule


def read_kohya_lora(path: str | Path) -> tuple[dict[str, FileModule], dict[str, str]]:
    """The modules and metadata of a kohya/LyCORIS-layout file; anything else is refused with a reason."""
    path = Path(path)
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name)
    if det.kind != "lora":
        raise ModelLoadError(f"'{path.name}' is not a LoRA: it is {det.architecture}")
    keys = [k for k in w.shapes if _kohya_name().match(k.partition(".")[0])]
    if not keys:
        raise ModelLoadError(f"'{path.name}' is a LoRA in the diffusers/PEFT layout; baking needs the kohya layout "
                             "(lora_unet_…/lora_te_… keys) that LoRA Studio exports by default")
    try:
        modules = read_modules(w.tensors(keys))
    except AdapterFileError as exc:
        raise ModelLoadError(f"'{path.name}': {exc}") from None
    return modules, w.metadata


def apply_kohya_lora(bundle: ModelBundle, modules: dict[str, FileModule], strength: float) -> dict[str, Any]:
    """Add each module's update to the model's weights in place; returns counts per component and misses."""
    index = bundle.family.kohya_index(bundle)
    counts: dict[str, int] = {}
    unmatched = []
    for name, lora in modules.items():
        target = index.get(name)
        if target is None:
            unmatched.append(name)
            continue
        component, module = target
        weight = module.weight
        try:
            delta = lora.delta(weight.detach(), strength)
        except AdapterFileError as exc:
            raise ModelLoadError(f"the LoRA does not fit this model: {exc}") from None
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        counts[component] = counts.get(component, 0) + 1
    return {"by_component": counts, "unmatched": unmatched}


def bakes_loras(family: Any) -> bool:
    """Whether a kohya/LyCORIS file's updates can be added to this family's weights (baking, LyCORIS previews)."""
    from studio.engine.families.base import Family

    return all(getattr(type(family), name) is not getattr(Family, name)
               for name in ("kohya_index", "single_file_state_dict", "checkpoint_metadata_ids"))


def _bake_refusal(family: Any) -> str | None:
    """Why LoRAs cannot be baked into this family's checkpoints (it lacks the family members baking needs), or None."""
    if bakes_loras(family):
        return None
    return (f"baking a LoRA into a {family.label} checkpoint is not supported yet; load the LoRA beside the model "
            "instead (ComfyUI's LoRA loader, Forge, or diffusers' load_lora_weights)")


def merge_lora_into_checkpoint(base: ModelSection, lora_path: str | Path, strength: float, out_path: str | Path,
                               dtype: torch.dtype = torch.float16, *,
                               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bake ``lora_path`` at ``strength`` into the base model and write ``out_path`` (.safetensors, original layout).

    scale = alpha / rank × strength for every module (what A1111, ComfyUI and kohya apply). The base model's
    separate VAE (``base.vae``), if set, is baked in too. The file is written atomically.
    """
    from studio.engine.checkpoint import load_model, resolve_model_path

    started = time.perf_counter()
    out_path = Path(out_path)
    lora_path = Path(lora_path)
    if out_path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"'{out_path.name}': merged checkpoints are written as .safetensors (pickle .ckpt files "
                             "can carry code); choose a name ending in .safetensors")
    say = progress or (lambda _msg: None)
    say("Reading the LoRA")
    modules, lora_meta = read_kohya_lora(lora_path)
    lora_family, _, _ = lora_family_of(lora_meta)
    if lora_family is not None and _bake_refusal(lora_family):  # said before loading a base model of many GB
        raise ModelLoadError(f"'{lora_path.name}' is a {lora_family.short_label} LoRA: {_bake_refusal(lora_family)}")
    say("Loading the base model")
    bundle = load_model(base, dtype=dtype)
    family = bundle.family
    if _bake_refusal(family):
        raise ModelLoadError(f"'{Path(base.path).name}' is a {family.label} model: {_bake_refusal(family)}")
    if lora_family is not None and lora_family is not family:
        raise ModelLoadError(f"'{lora_path.name}' was trained for {lora_family.short_label} but the base model is "
                             f"{family.label}; choose a matching base model")
    say(f"Baking {len(modules)} LoRA modules at strength {strength:g}")
    applied = apply_kohya_lora(bundle, modules, strength)
    merged = sum(applied["by_component"].values())
    if merged == 0:
        raise ModelLoadError(f"none of the {len(modules)} modules in '{lora_path.name}' exist in this "
                             f"{family.label} model; the LoRA was made for another model")
    say("Writing the checkpoint")
    state = family.single_file_state_dict(bundle, dtype)
    # Keys of the original file the conversion does not write, and the markers other tools read.
    state.update(family.single_file_extras(bundle, resolve_model_path(base.path), set(state), dtype))
    resolution = _resolution(bundle)
    ids = family.checkpoint_metadata_ids(bundle.prediction_type)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ids["modelspec.architecture"],
        "modelspec.implementation": ids["modelspec.implementation"],
        "modelspec.title": out_path.stem,
        "modelspec.prediction_type": ids["modelspec.prediction_type"],
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _dt.date.today().isoformat(),
        "lora_studio.merge": json.dumps({"base": Path(base.path).name, "lora": lora_path.name, "strength": strength,
                                         "modules": merged}),
    }
    save_safetensors(state, out_path, metadata)
    return {
        "path": str(out_path),
        "family": family.name,
        "prediction_type": bundle.prediction_type,
        "strength": strength,
        "dtype": str(dtype).removeprefix("torch."),
        "modules_merged": merged,
        "modules_in_lora": len(modules),
        "by_component": applied["by_component"],
        "unmatched": applied["unmatched"],
        "size_bytes": out_path.stat().st_size,
        "time_s": time.perf_counter() - started,
    }


def _resolution(bundle: ModelBundle) -> int:
    """The model's native size: the denoiser's latent size times the VAE's downscale (64 × 8 = 512 for SD1.5)."""
    size = getattr(bundle.denoiser.config, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not size:
        return bundle.family.native_resolution(bundle.prediction_type)
    return int(size) * 2 ** (len(bundle.vae.config.block_out_channels) - 1)


def diffusers_folder_to_single_file(folder: str | os.PathLike, out: str | os.PathLike, *,
                                    dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
                                    extra: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Convert a diffusers folder (e.g. a tiny test model) into one single-file checkpoint in its family's layout."""
    from studio.engine.checkpoint import load_model

    bundle = load_model(ModelSection(path=str(folder)))
    state = bundle.family.single_file_state_dict(bundle, dtype)
    state.update(extra or {})
    return save_safetensors(state, out, metadata)
