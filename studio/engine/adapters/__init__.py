"""Adapter types (LoRA, LoCon, DoRA, LoHa, LoKr): the registry, injection, state dicts, and a file's modules."""

# Each type is one module here implementing base.Adapter; this file is what the core calls. Which type a job
# trains follows from its lora section (adapter_for); which type a trained layer carries from the layer
# (adapter_of_layer); which type a module of a file holds from its key suffixes (read_modules).

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from studio.engine.adapters.base import ADAPTER_NAME, Adapter, AdapterFileError, FileModule, dora_weight
from studio.engine.adapters.dora import DORA
from studio.engine.adapters.locon import LOCON
from studio.engine.adapters.loha import LOHA
from studio.engine.adapters.lokr import LOKR
from studio.engine.adapters.lora import LORA

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import LoraSection
    from studio.engine.families import ModelBundle

__all__ = ["ADAPTER_NAME", "ADAPTERS", "Adapter", "AdapterFileError", "FileModule", "adapter_for", "adapter_of_layer",
           "adapter_layers", "components", "inject", "state_dicts", "load_state_dicts", "read_modules", "dora_weight"]

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (LORA, LOCON, DORA, LOHA, LOKR)}
ALGORITHMS = ("lora", "loha", "lokr")  # lora.algorithm's choices; LoCon and DoRA are LoRA with options
_LAYER_OWNERS = (DORA, LORA, LOHA, LOKR)  # DoRA before LoRA: both are peft LoraLayers
_FILE_READERS = (LOHA, LOKR, LORA)  # by key suffix; DoRA files are LoRA modules with dora_scale


def adapter_for(lora: "LoraSection") -> Adapter:
    """The adapter type a job's lora section trains."""
    algorithm = getattr(lora, "algorithm", "lora")
    if algorithm in ("loha", "lokr"):
        return ADAPTERS[algorithm]
    if algorithm != "lora":
        raise ValueError(f"unknown adapter algorithm '{algorithm}'; choose one of: {', '.join(ALGORITHMS)}")
    if lora.dora:
        return DORA
    return LOCON if lora.targets == "+conv" else LORA


def adapter_of_layer(layer: torch.nn.Module) -> Adapter | None:
    """The adapter type a peft-wrapped layer carries under ADAPTER_NAME (None for a plain layer)."""
    return next((a for a in _LAYER_OWNERS if a.owns_layer(layer)), None)


def adapter_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Module name → peft layer carrying one of our adapters (ADAPTER_NAME), in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter_of_layer(m) is not None}


def components(bundle: "ModelBundle") -> dict[str, torch.nn.Module]:
    """The bundle's adapter-capable parts by the family's component names (denoiser first, then text encoders)."""
    return bundle.components()


def inject(bundle: "ModelBundle", lora: "LoraSection", *, train_text_encoder: bool) -> dict[str, list[torch.nn.Parameter]]:
    """Add the job's adapter to the denoiser (and the text encoders if chosen); the trainable params per component."""
    from diffusers.training_utils import cast_training_params

    adapter = adapter_for(lora)
    parts = components(bundle)
    trained = (bundle.family.denoiser_name, *(bundle.family.trainable_text_encoders() if train_text_encoder else ()))
    chosen = {k: m for k, m in parts.items() if k in trained}
    for key, model in parts.items():
        if adapter_layers(model):
            raise ValueError(f"the {key} already has a LoRA adapter; load a fresh model before injecting another")
    for module in (*parts.values(), bundle.vae):
        if module is not None:
            module.requires_grad_(False)
    trainable: dict[str, list[torch.nn.Parameter]] = {}
    for key, model in chosen.items():
        model.add_adapter(adapter.peft_config(lora, bundle.family, key, model), adapter_name=ADAPTER_NAME)
        # Adapters are created in the base weights' dtype; optimizer state and updates of fp16/bf16 adapter
        # weights lose too much precision, so the trainable parameters are kept in fp32 (the forward pass
        # still runs in the base dtype under autocast).
        cast_training_params(model, dtype=torch.float32)
        trainable[key] = [p for p in model.parameters() if p.requires_grad]
    return trainable


def state_dicts(bundle: "ModelBundle") -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights per component in peft layout (for checkpoints and resuming), any adapter type."""
    from peft.utils import get_peft_model_state_dict

    return {
        key: {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False).items()}
        for key, model in components(bundle).items() if adapter_layers(model)
    }


def load_state_dicts(bundle: "ModelBundle", sds: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load weights from ``state_dicts`` into already injected adapters; every key must match."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    parts = components(bundle)
    problems = []
    for key, sd in sds.items():
        model = parts.get(key)
        if model is None or not adapter_layers(model):
            problems.append(f"{key}: the saved state has LoRA weights for it but the model has no LoRA there")
            continue
        expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False))
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            problems.append(f"{key}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for key, model in parts.items():
        if key not in sds and adapter_layers(model):
            problems.append(f"{key}: the model has a LoRA there but the saved state has none")
    if problems:
        raise ValueError("the saved LoRA state does not fit this model (were the LoRA settings changed?):\n  "
                         + "\n  ".join(problems))
    for key, sd in sds.items():
        # load_state_dict copies into the existing parameters, so fp32 adapter weights stay fp32.
        result = set_peft_model_state_dict(parts[key], sd, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{key}: LoRA weights not used: {result.unexpected_keys[:3]}")


# ------------------------------------------------------------------------------------------------ files

KNOWN_SUFFIXES = frozenset({
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
})
# What other LyCORIS algorithms' modules hold, to name them in a refusal.
_OTHER_ALGORITHMS = {"oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT", "a1.weight": "GLoRA", "diff": "full (diff)",
                     "w_norm": "norm", "b_norm": "norm", "weight": "(IA)³", "on_input": "(IA)³", "diff_b": "full (diff)"}


def read_module(name: str, tensors: dict[str, torch.Tensor]) -> FileModule:
    """One module of a kohya/LyCORIS file by its algorithm; unknown algorithms and bad factors are refused."""
    suffixes = set(tensors)
    unknown = sorted(suffixes - KNOWN_SUFFIXES)
    if unknown:
        algo = next((_OTHER_ALGORITHMS[s] for s in unknown if s in _OTHER_ALGORITHMS), None)
        what = f"the LyCORIS algorithm {algo}" if algo else f"keys LoRA Studio does not know ({', '.join(unknown[:3])})"
        raise AdapterFileError(f"module {name} uses {what}; LoRA Studio applies LoRA, LoCon, DoRA, LoHa and LoKr only")
    reader = next((a for a in _FILE_READERS if a.claims(suffixes)), None)
    if reader is None:
        raise AdapterFileError(f"module {name} has only {', '.join(sorted(suffixes))}: no weights of a known "
                               "algorithm (LoRA lora_down/lora_up, LoHa hada_*, LoKr lokr_*)")
    return reader.file_module(name, tensors)


def read_modules(tensors: dict[str, torch.Tensor]) -> dict[str, FileModule]:
    """All modules of a kohya/LyCORIS-layout state dict (``<name>.<suffix>`` keys), each checked."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        # The name ends where a known suffix starts: names may hold dots (Z-Image's "diffusion_model.layers.0…");
        # an unknown suffix splits at the first dot, so read_module names it.
        suffix = max((s for s in KNOWN_SUFFIXES if key.endswith("." + s)), key=len, default=None)
        name, _, suffix = (key[: -len(suffix) - 1], ".", suffix) if suffix else key.partition(".")
        grouped.setdefault(name, {})[suffix] = value
    return {name: read_module(name, parts) for name, parts in grouped.items()}
