"""The model families LoRA Studio trains: a registry the core iterates (by name, or trying each on a file).

Each entry names the module and object of one family (see base.Family and README.md). Modules are imported
on first use, so listing the names (the job configuration does) costs no torch import.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from studio.engine.families.base import Conditioning, Family, ModelBundle, Part, PreviewDefaults

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from studio.engine.detect import Detection

__all__ = [
    "Conditioning", "Family", "ModelBundle", "Part", "PreviewDefaults", "DEFAULT_FAMILY", "names", "get_family",
    "registered", "detect_file", "family_of_folder", "lora_family", "supported_text", "family_label",
    "component_names", "kohya_prefixes",
]

# name → ("module:object", label). The order is the order families are tried on a file and listed to people.
# The label is here too (and checked against the object's) so a page can name a family without importing it.
REGISTRY: dict[str, tuple[str, str]] = {
    "sd1": ("studio.engine.families.sd:SD1", "Stable Diffusion 1.x"),
    "sd2": ("studio.engine.families.sd:SD2", "Stable Diffusion 2.x"),
    "sdxl": ("studio.engine.families.sdxl:SDXL", "Stable Diffusion XL"),
    "flux-dev": ("studio.engine.families.flux:FLUX_DEV", "FLUX.1 [dev]"),
    "flux-schnell": ("studio.engine.families.flux:FLUX_SCHNELL", "FLUX.1 [schnell]"),
    "sd3": ("studio.engine.families.sd3:SD3_MEDIUM", "Stable Diffusion 3 Medium"),
    "sd3.5-medium": ("studio.engine.families.sd3:SD35_MEDIUM", "Stable Diffusion 3.5 Medium"),
    "sd3.5-large": ("studio.engine.families.sd3:SD35_LARGE", "Stable Diffusion 3.5 Large"),
    "zimage": ("studio.engine.families.zimage:ZIMAGE", "Z-Image"),
    "qwen-image": ("studio.engine.families.qwenimage:QWEN_IMAGE", "Qwen-Image"),
}
# Assumed where nothing tells the family (the built-in demo model is a tiny one of it).
DEFAULT_FAMILY = "sd1"

_loaded: dict[str, Family] = {}


def names() -> tuple[str, ...]:
    """The registered family names, e.g. for the job's ``model.family`` choices."""
    return tuple(REGISTRY)


def get_family(name: str | Family) -> Family:
    """The family object registered under ``name`` (a Family passes through)."""
    if isinstance(name, Family):
        return name
    if name not in _loaded:
        try:
            target, label = REGISTRY[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown model family '{name}'; supported: {', '.join(REGISTRY)}") from None
        module, attribute = target.split(":")
        family = getattr(importlib.import_module(module), attribute)
        if (family.name, family.label) != (name, label):  # a registry typo would otherwise surface much later
            raise RuntimeError(f"the registry entry '{name}' ({label}) points to '{family.name}' ({family.label})")
        _loaded[name] = family
    return _loaded[name]


def registered() -> list[Family]:
    """Every registered family, in registry order."""
    return [get_family(name) for name in REGISTRY]


def supported_text() -> str:
    """The families for a sentence: "Stable Diffusion 1.x, 2.x and SDXL"."""
    listed = [get_family(name).listed_as for name in REGISTRY]
    return listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]


def detect_file(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], filename: str = "",
                tensor: Callable[[str], "torch.Tensor"] | None = None) -> "Detection | None":
    """The first family's Detection of a single file (usable or with a problem), or None if no family claims it."""
    for family in registered():
        found = family.detect_file(shapes, metadata, filename, tensor)
        if found is not None:
            return found
    return None


def family_of_folder(folder: Path) -> Family | None:
    """The family of a diffusers folder (model_index.json and its configs), or None."""
    from studio.engine.jsonfile import JsonFileError, read_json_object

    try:
        index = read_json_object(Path(folder) / "model_index.json", what="the model index")
    except JsonFileError:  # the loader reports a broken index by name before it asks here
        index = {}
    for family in registered():
        if family.detect_folder(Path(folder), index):
            return family
    return None


def lora_family(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]] | None = None,
                layout: str = "kohya") -> tuple[Family | None, str | None, str | None]:
    """(family, prediction type, how the family was told: "metadata" | "keys") of a LoRA file.

    The metadata ids win over key names; the strongest evidence wins, ties go to the earlier family.
    """
    families = registered()
    family, source = _strongest(families, lambda f: f.lora_metadata_evidence(metadata)), "metadata"
    if family is None and shapes is not None:
        family, source = _strongest(families, lambda f: f.lora_key_evidence(shapes, layout)), "keys"
    spec = metadata.get("modelspec.prediction_type")
    prediction = None
    if spec == "v" or any(f.lora_metadata_prediction(metadata) == "v_prediction" for f in families):
        prediction = "v_prediction"
    elif spec == "epsilon":
        prediction = "epsilon"
    return family, prediction, source if family is not None else None


def _strongest(families: list[Family], evidence: Callable[[Family], int]) -> Family | None:
    best, score = None, 0
    for family in families:
        value = evidence(family)
        if value > score:
            best, score = family, value
    return best


def family_label(name: str | None) -> str | None:
    """A family's label for people, or None for an unknown name (imports nothing)."""
    return REGISTRY[name][1] if name in REGISTRY else None


def component_names() -> tuple[str, ...]:
    """Every component name any registered family uses (denoisers and text encoders), in first-seen order."""
    seen: dict[str, None] = {}
    for family in registered():
        seen.update(dict.fromkeys(family.component_names()))
    return tuple(seen)


def kohya_prefixes() -> tuple[str, ...]:
    """Every kohya LoRA key prefix any registered family writes (lora_unet, lora_te, lora_te1 …)."""
    seen: dict[str, None] = {}
    for family in registered():
        seen.update(dict.fromkeys(family.kohya_prefixes.values()))
    return tuple(seen)
