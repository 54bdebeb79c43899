"""Adapters on a model bundle, by the names the rest of the engine uses: targets, inject, layers, state dicts.

The behaviour lives in ``studio.engine.adapters`` (one module per adapter type); this module keeps the
engine's long-standing entry points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from studio.engine import adapters
from studio.engine.adapters import ADAPTER_NAME, adapter_for, adapter_layers, adapter_of_layer, components
from studio.engine.adapters.base import is_spatial_conv as _is_spatial_conv  # noqa: F401  (kept name)
from studio.engine.adapters.base import selected_modules
from studio.engine.families import Family, get_family

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.families import ModelBundle
    from studio.engine.config import LoraSection

__all__ = ["ADAPTER_NAME", "PRESETS", "components", "count_lora_modules", "inject_lora", "load_lora_state_dicts",
           "lora_config", "lora_layers", "lora_state_dicts", "matching_modules", "target_modules"]

PRESETS = ("attention", "kohya-default", "+conv")


def target_modules(family: Family | str, preset: str, component: str) -> str:
    """The peft ``target_modules`` expression (full-match regex) for a preset and a component (the family's)."""
    family = get_family(family)
    if preset not in PRESETS:
        raise ValueError(f"unknown LoRA target preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return family.lora_targets(preset, component)


def matching_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` that ``pattern`` selects (what peft will wrap)."""
    return selected_modules(model, pattern)


def lora_config(lora: "LoraSection", family: Family | str, component: str, model: torch.nn.Module) -> Any:
    """The peft config of the job's adapter type for one component."""
    target_modules(family, lora.targets, component)  # an unknown preset is refused with the list
    return adapter_for(lora).peft_config(lora, get_family(family), component, model)


def inject_lora(bundle: "ModelBundle", lora: "LoraSection", *, train_text_encoder: bool) -> dict[str, list[torch.nn.Parameter]]:
    """Add the job's adapter (LoRA, LoCon, DoRA, LoHa or LoKr) to the bundle; the trainable params per component."""
    from studio.engine.config import Problem
    from studio.engine.failures import JobInvalid

    target_modules(bundle.family, lora.targets, bundle.family.denoiser_name)
    params = adapters.inject(bundle, lora, train_text_encoder=train_text_encoder)
    # Refused now, not after training at the export: adapters the family's kohya layout cannot hold.
    problem = fused_layer_problem(bundle)
    if problem:
        raise JobInvalid([Problem("lora.dora" if lora.dora and lora.algorithm == "lora" else "lora.algorithm", problem)])
    return params


def lora_layers(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, Any]:
    """Module name → peft layer carrying the adapter (any type), in module order."""
    if adapter_name != ADAPTER_NAME:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {n: m for n, m in model.named_modules()
                if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {})}
    return adapter_layers(model)


def count_lora_modules(model: torch.nn.Module, adapter_name: str | None = None) -> int:
    """How many modules of ``model`` carry an adapter (any adapter, or the named one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def carries(module: Any) -> bool:
        names = set()
        for attr in module.adapter_layer_names:
            names |= set(getattr(module, attr).keys())
        return bool(names) if adapter_name is None else adapter_name in names

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and carries(m))


def lora_state_dicts(bundle: "ModelBundle") -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights per component in peft layout (for checkpoints and resuming)."""
    return adapters.state_dicts(bundle)


def load_lora_state_dicts(bundle: "ModelBundle", sds: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load weights from ``lora_state_dicts`` into already injected adapters; every key must match."""
    adapters.load_state_dicts(bundle, sds)


def fused_layer_problem(bundle: "ModelBundle") -> str | None:
    """Why the bundle's adapters cannot be written in kohya layout because the family's original model fuses layers
    they adapt separately (Flux's and SD3's q/k/v), or None. Only plain LoRA modules join exactly (stacked downs,
    block-diagonal up); a LoHa, LoKr or DoRA of each part has no fused form. Names only: cheap, before training."""
    seen: dict[str, str] = {}
    for key, model in components(bundle).items():
        for path, layer in lora_layers(model).items():
            adapter = adapter_of_layer(layer)
            if adapter.name in ("lora", "locon"):
                continue
            name = bundle.family.kohya_name(key, path, bundle.denoiser.config)
            if name in seen:
                field = "lora.dora" if adapter.name == "dora" else "lora.algorithm"
                return (f"{adapter.label} cannot be written for {bundle.family.label}: its kohya/ComfyUI layout fuses "
                        f"{seen[name]} and {path} into one layer ({name}), and a {adapter.label} of each part has "
                        f"no fused form (only a plain LoRA joins exactly). Train a plain LoRA: set lora.algorithm = "
                        f"lora{' and lora.dora = false' if field == 'lora.dora' else ''}")
            seen[name] = path
    return None
