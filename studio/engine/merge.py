"""Bake a kohya-format LoRA into a base model and save one original-layout checkpoint that A1111/ComfyUI load."""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from studio.engine.config import ModelSection
from studio.engine.detect import detect
from studio.engine.ldm import TEXT_ENCODER_PREFIXES, ldm_state_dict, save_safetensors, unet_module_path, unet_prefix_map
from studio.engine.safe_load import ModelLoadError, open_weights

_KOHYA = re.compile(r"^(lora_(?:unet|te|te1|te2)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha|lora_mid\.weight|dora_scale)$")

ARCHITECTURES = {  # Stability's modelspec names for full checkpoints
    ("sd1", "epsilon"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
}
IMPLEMENTATIONS = {"sd1": "https://github.com/CompVis/stable-diffusion",
                   "sd2": "https://github.com/Stability-AI/stablediffusion",
                   "sdxl": "https://github.com/Stability-AI/generative-models"}


@dataclass
class KohyaModule:
    """One adapted layer of a kohya LoRA: ``ΔW = up @ down × alpha / rank``."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, weight_shape: torch.Size, strength: float) -> torch.Tensor:
        update = self.up.float().flatten(1) @ self.down.float().flatten(1)
        if update.numel() != weight_shape.numel():
            raise ValueError(f"{tuple(update.shape)} vs {tuple(weight_shape)}")
        # Computed in fp32 whatever the file's precision, then added once: no fp16 rounding of small updates.
        return (update * (self.alpha / self.rank * strength)).reshape(weight_shape)


def read_kohya_lora(path: str | Path) -> tuple[dict[str, KohyaModule], dict[str, str]]:
    """The modules and metadata of a kohya-layout LoRA file; anything else is refused with a reason."""
    path = Path(path)
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name)
    if det.kind != "lora":
        raise ModelLoadError(f"'{path.name}' is not a LoRA: it is {det.architecture}")
    if "LyCORIS" in det.architecture:
        raise ModelLoadError(f"'{path.name}' is a LyCORIS network (LoHa/LoKr/OFT); only plain LoRA/LoCon can be baked")
    parts: dict[str, dict[str, str]] = {}
    for key in w.shapes:
        m = _KOHYA.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = key
    if not parts:
        raise ModelLoadError(f"'{path.name}' is a LoRA in the diffusers/PEFT layout; baking needs the kohya layout "
                             "(lora_unet_…/lora_te_… keys) that LoRA Studio exports by default")
    if any("dora_scale" in p for p in parts.values()):
        raise ModelLoadError(f"'{path.name}' is a DoRA LoRA; tools disagree on how to apply its magnitude, so it "
                             "cannot be baked faithfully. Bake a plain LoRA instead")
    if any("lora_mid.weight" in p for p in parts.values()):
        raise ModelLoadError(f"'{path.name}' uses LoCon's Tucker (lora_mid) decomposition, which cannot be baked here")
    tensors = w.tensors([k for p in parts.values() for k in p.values()])
    modules = {}
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise ModelLoadError(f"'{path.name}' is incomplete: module {name} lacks its down or up weight")
        down, up = tensors[p["lora_down.weight"]], tensors[p["lora_up.weight"]]
        # kohya's convention: a module without .alpha is not scaled (alpha = rank).
        alpha = float(tensors[p["alpha"]].float().item()) if "alpha" in p else float(down.shape[0])
        modules[name] = KohyaModule(name, down, up, alpha)
    return modules, w.metadata


def kohya_module_index(family: str, unet: Any, text_encoders: list[Any]) -> dict[str, tuple[str, torch.nn.Module]]:
    """Every kohya name a layer may carry → (component, module); both UNet naming styles are accepted.

    kohya's SD1/SD2 LoRAs name UNet layers by diffusers paths, its SDXL LoRAs by the original (SGM) paths;
    text-encoder names include ``text_model_`` except in some files written via diffusers on transformers ≥ 5.6.
    """
    index: dict[str, tuple[str, torch.nn.Module]] = {}
    rows = unet_prefix_map(unet.config)
    for name, module in unet.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or not name:
            continue
        index["lora_unet_" + name.replace(".", "_")] = ("unet", module)
        try:
            index["lora_unet_" + unet_module_path(name, unet.config, rows).replace(".", "_")] = ("unet", module)
        except ValueError:
            pass
    prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    for i, (encoder, prefix) in enumerate(zip(text_encoders, prefixes)):
        component = "text_encoder" if i == 0 else "text_encoder_2"
        aliases = [prefix] + (["lora_te1"] if family != "sdxl" else [])
        for name, module in encoder.named_modules():
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or not name:
                continue
            path = name.removeprefix("text_model.").replace(".", "_")
            for alias in aliases:
                index[f"{alias}_text_model_{path}"] = (component, module)
                index.setdefault(f"{alias}_{path}", (component, module))
    return index


def apply_kohya_lora(family: str, unet: Any, text_encoders: list[Any], modules: dict[str, KohyaModule],
                     strength: float) -> dict[str, Any]:
    """Add each module's update to the model's weights in place; returns counts per component and misses."""
    index = kohya_module_index(family, unet, text_encoders)
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
            delta = lora.delta(weight.shape, strength)
        except ValueError as exc:
            raise ModelLoadError(f"the LoRA does not fit this model: {name} has shape {exc}; it was probably "
                                 "trained for another model family") from None
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        counts[component] = counts.get(component, 0) + 1
    return {"by_component": counts, "unmatched": unmatched}


def _lora_family(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def _carried_keys(base_path: Path, written: set[str], family: str) -> dict[str, torch.Tensor]:
    """Weights of the original file the conversion does not produce but the original loaders know.

    E.g. SD2's unused last OpenCLIP layer, ``text_projection`` and ``logit_scale``: A1111 builds the full
    OpenCLIP model and would otherwise report them missing. UNet/VAE/CLIP-L are always written in full.
    """
    if not base_path.is_file():
        return {}
    w = open_weights(base_path)
    open_clip = [p for p in TEXT_ENCODER_PREFIXES[family] if p.endswith(".model.")]
    keep = [k for k in w.shapes if k not in written and k.startswith(tuple(open_clip)) and not k.startswith("model_ema.")]
    return w.tensors(keep) if keep else {}


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
    say("Loading the base model")
    bundle = load_model(base, dtype=dtype)
    family = bundle.family.name
    lora_family = _lora_family(lora_meta)
    if lora_family and lora_family != family:
        raise ModelLoadError(f"'{lora_path.name}' was trained for {lora_family.upper()} but the base model is "
                             f"{bundle.family.label}; choose a matching base model")
    say(f"Baking {len(modules)} LoRA modules at strength {strength:g}")
    applied = apply_kohya_lora(family, bundle.unet, bundle.text_encoders, modules, strength)
    merged = sum(applied["by_component"].values())
    if merged == 0:
        raise ModelLoadError(f"none of the {len(modules)} modules in '{lora_path.name}' exist in this "
                             f"{bundle.family.label} model; the LoRA was made for another model")
    say("Writing the checkpoint")
    state = ldm_state_dict(family, bundle.unet, bundle.vae, bundle.text_encoders, dtype)
    state.update({k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in _carried_keys(resolve_model_path(base.path), set(state), family).items()})
    if bundle.prediction_type == "v_prediction":
        state["v_pred"] = torch.zeros(0)  # ComfyUI's marker for v-prediction checkpoints; others ignore it
    if bundle.noise_scheduler.config.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.zeros(0)
    resolution = (bundle.unet.config.sample_size or 64) * 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES.get((family, bundle.prediction_type), f"stable-diffusion-{family}"),
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": out_path.stem,
        "modelspec.prediction_type": "v" if bundle.prediction_type == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _dt.date.today().isoformat(),
        "lora_studio.merge": json.dumps({"base": Path(base.path).name, "lora": lora_path.name, "strength": strength,
                                         "modules": merged}),
    }
    save_safetensors(state, out_path, metadata)
    return {
        "path": str(out_path),
        "family": family,
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
