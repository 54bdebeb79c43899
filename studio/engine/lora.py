"""LoRA adapters (peft) on a model bundle: which layers, rank/alpha/DoRA, fp32 trainable params, state dicts."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from studio.engine.families import Family, get_family

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.families import ModelBundle
    from studio.engine.config import LoraSection

ADAPTER_NAME = "default"
PRESETS = ("attention", "kohya-default", "+conv")


def target_modules(family: Family | str, preset: str, component: str) -> str:
    """The peft ``target_modules`` expression (full-match regex) for a preset and a component (the family's)."""
    family = get_family(family)
    if preset not in PRESETS:
        raise ValueError(f"unknown LoRA target preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    return family.lora_targets(preset, component)


def matching_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` that ``pattern`` selects (what peft will wrap)."""
    rx = re.compile(pattern)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and rx.fullmatch(name)
    ]


def _is_spatial_conv(module: torch.nn.Module) -> bool:
    # kohya gives 1x1 convolutions the normal rank (they are linear maps); only k x k convs use conv_dim.
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def components(bundle: "ModelBundle") -> dict[str, torch.nn.Module]:
    """The bundle's LoRA-capable parts by the family's component names (denoiser first, then text encoders)."""
    return bundle.components()


def lora_config(lora: "LoraSection", family: Family | str, component: str, model: torch.nn.Module) -> Any:
    """The peft LoraConfig for one component; conv layers get conv_rank/conv_alpha via rank/alpha patterns."""
    from peft import LoraConfig

    pattern = target_modules(family, lora.targets, component)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if lora.targets == "+conv" and component == get_family(family).denoiser_name:
        conv_rank = lora.conv_rank or lora.rank
        conv_alpha = lora.conv_alpha or lora.alpha
        modules = dict(model.named_modules())
        for name in matching_modules(model, pattern):
            if _is_spatial_conv(modules[name]):
                # Exact names (escaped): peft matches pattern keys as `(.*\.)?(key)$`.
                if conv_rank != lora.rank:
                    rank_pattern[re.escape(name)] = conv_rank
                if conv_alpha != lora.alpha:
                    alpha_pattern[re.escape(name)] = conv_alpha
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.dora,
        target_modules=pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        # kohya's initialisation: A kaiming-uniform, B zero, so the untrained LoRA changes nothing.
        init_lora_weights=True,
    )


def inject_lora(bundle: "ModelBundle", lora: "LoraSection", *, train_text_encoder: bool) -> dict[str, list[torch.nn.Parameter]]:
    """Add LoRA adapters to the denoiser (and the text encoders if chosen); return the trainable params per component."""
    from diffusers.training_utils import cast_training_params

    parts = components(bundle)
    trained = (bundle.family.denoiser_name, *(bundle.family.trainable_text_encoders() if train_text_encoder else ()))
    chosen = {k: m for k, m in parts.items() if k in trained}
    for key, model in parts.items():
        if lora_layers(model):
            raise ValueError(f"the {key} already has a LoRA adapter; load a fresh model before injecting another")
    for module in (*parts.values(), bundle.vae):
        if module is not None:
            module.requires_grad_(False)
    trainable: dict[str, list[torch.nn.Parameter]] = {}
    for key, model in chosen.items():
        model.add_adapter(lora_config(lora, bundle.family, key, model), adapter_name=ADAPTER_NAME)
        # Adapters are created in the base weights' dtype; optimizer state and updates of fp16/bf16 LoRA
        # weights lose too much precision, so the trainable parameters are kept in fp32 (the forward pass
        # still runs in the base dtype under autocast).
        cast_training_params(model, dtype=torch.float32)
        trainable[key] = [p for p in model.parameters() if p.requires_grad]
    return trainable


def lora_layers(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, Any]:
    """Module name → peft LoRA layer carrying ``adapter_name``, in module order."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def count_lora_modules(model: torch.nn.Module, adapter_name: str | None = None) -> int:
    """How many modules of ``model`` carry a LoRA (any adapter, or the named one)."""
    from peft.tuners.lora import LoraLayer

    return sum(
        1 for module in model.modules()
        if isinstance(module, LoraLayer) and (module.lora_A.keys() if adapter_name is None else adapter_name in module.lora_A)
    )


def lora_state_dicts(bundle: "ModelBundle") -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights per component in peft layout (for checkpoints and resuming)."""
    from peft.utils import get_peft_model_state_dict

    return {
        key: {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False).items()}
        for key, model in components(bundle).items() if lora_layers(model)
    }


def load_lora_state_dicts(bundle: "ModelBundle", sds: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load weights from ``lora_state_dicts`` into already injected adapters; every key must match."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    parts = components(bundle)
    problems = []
    for key, sd in sds.items():
        model = parts.get(key)
        if model is None or not lora_layers(model):
            problems.append(f"{key}: the saved state has LoRA weights for it but the model has no LoRA there")
            continue
        expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False))
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            problems.append(f"{key}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for key, model in parts.items():
        if key not in sds and lora_layers(model):
            problems.append(f"{key}: the model has a LoRA there but the saved state has none")
    if problems:
        raise ValueError("the saved LoRA state does not fit this model (were the LoRA settings changed?):\n  "
                         + "\n  ".join(problems))
    for key, sd in sds.items():
        # load_state_dict copies into the existing parameters, so fp32 LoRA weights stay fp32.
        result = set_peft_model_state_dict(parts[key], sd, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{key}: LoRA weights not used: {result.unexpected_keys[:3]}")
