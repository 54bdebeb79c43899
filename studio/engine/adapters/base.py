"""The adapter protocol: what the core asks an adapter type (LoRA, LoCon, DoRA, LoHa, LoKr) for, and a file's module."""

# An adapter type owns four things (DESIGN.md §6): how it is injected (its peft config), how its trained weights
# are read back from a layer, the tensors it writes in the kohya/LyCORIS layout, and the weight change ("merge
# delta") a consumer applies for one module of a file. The trainer, export, merge and the pages ask the adapter;
# none of them tests an adapter's name.

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import LoraSection
    from studio.engine.families import Family

ADAPTER_NAME = "default"


class AdapterFileError(ValueError):
    """A LoRA/LyCORIS file whose modules cannot be applied; the message names the module and the problem."""


def is_spatial_conv(module: torch.nn.Module) -> bool:
    # kohya gives 1x1 convolutions the normal rank (they are linear maps); only k x k convs use conv_dim.
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def selected_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` that ``pattern`` selects (what peft will wrap)."""
    rx = re.compile(pattern)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and rx.fullmatch(name)
    ]


@dataclass
class Targets:
    """Which modules of one component an adapter wraps, and the per-module rank/alpha of spatial convolutions."""

    pattern: str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def targets(lora: "LoraSection", family: "Family", component: str, model: torch.nn.Module) -> Targets:
    """The family's module selection for the job's preset; '+conv' convs get conv_rank/conv_alpha (LoCon's rule)."""
    from studio.engine.families import get_family

    family = get_family(family)
    found = Targets(family.lora_targets(lora.targets, component))
    if lora.targets == "+conv" and component == family.denoiser_name:
        conv_rank = lora.conv_rank or lora.rank
        conv_alpha = lora.conv_alpha or lora.alpha
        modules = dict(model.named_modules())
        for name in selected_modules(model, found.pattern):
            if is_spatial_conv(modules[name]):
                # Exact names (escaped): peft matches pattern keys as `(.*\.)?(key)$`.
                if conv_rank != lora.rank:
                    found.rank_pattern[re.escape(name)] = conv_rank
                if conv_alpha != lora.alpha:
                    found.alpha_pattern[re.escape(name)] = conv_alpha
    return found


class Adapter(abc.ABC):
    """One adapter type. Subclasses are singletons registered in ``adapters/__init__.py``."""

    name: str  # job value of lora.algorithm's resolved type and the registry key: "lora", "loha" …
    label: str  # for people: "LoHa (LyCORIS)"
    network_module: str = "networks.lora"  # ss_network_module: kohya's LoRA module or LyCORIS's
    algo: str | None = None  # LyCORIS's ``algo`` network argument, where it has one

    def __repr__(self) -> str:
        return f"<adapter {self.name}>"

    # ----------------------------------------------------------------------------------------- training side

    @abc.abstractmethod
    def peft_config(self, lora: "LoraSection", family: "Family", component: str, model: torch.nn.Module) -> Any:
        """The peft config that injects this adapter into one component."""

    @abc.abstractmethod
    def owns_layer(self, layer: torch.nn.Module) -> bool:
        """Whether a peft-wrapped layer carries this adapter type (under ADAPTER_NAME)."""

    @abc.abstractmethod
    def export_tensors(self, layer: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The kohya/LyCORIS-layout tensors of one trained layer by key suffix (``lora_down.weight``, ``alpha`` …)."""

    @abc.abstractmethod
    def trained_delta(self, layer: Any) -> torch.Tensor:
        """W_trained − W of one layer in fp32, shaped like the base weight (what the trained model adds)."""

    def export_suffixes(self, layer: Any) -> list[str]:
        """The key suffixes ``export_tensors`` writes for a layer, without computing any tensor (meta models too)."""
        return list(self.export_tensors(layer, torch.float32))

    def network_args(self, lora: "LoraSection") -> dict[str, str]:
        """``ss_network_args`` as the tool that defines this module writes them (all values strings)."""
        if lora.targets == "+conv":
            return {"conv_dim": str(lora.conv_rank or lora.rank), "conv_alpha": str(float(lora.conv_alpha or lora.alpha))}
        return {}

    def export_problem(self, lora: "LoraSection") -> str | None:
        """Why this adapter cannot be written in the kohya/LyCORIS layout with these settings, or None."""
        return None

    # ------------------------------------------------------------------------------------------ file side

    file_keys: tuple[str, ...] = ()  # key suffixes of a module in a file that say "this algorithm"

    def claims(self, suffixes: set[str]) -> bool:
        """Whether a file module with these key suffixes is this algorithm's."""
        return any(s in suffixes for s in self.file_keys)

    @abc.abstractmethod
    def file_module(self, name: str, tensors: dict[str, torch.Tensor]) -> "FileModule":
        """One module of a file, checked (factor shapes agree); raises AdapterFileError naming the module."""


@dataclass
class FileModule:
    """One adapted layer read from a file: its algorithm's tensors and how a consumer turns them into ΔW."""

    name: str
    adapter: Adapter
    tensors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        return self.adapter.file_rank(self) if hasattr(self.adapter, "file_rank") else None

    def delta(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The change of ``weight`` at ``strength`` (fp32, weight-shaped), as LyCORIS/kohya consumers compute it."""
        update = self.adapter.file_update(self)  # type: ignore[attr-defined]
        if update.numel() != weight.numel():
            raise AdapterFileError(
                f"module {self.name}: its {self.adapter.label} factors make a {tuple(update.shape)} update but the "
                f"model's weight is {tuple(weight.shape)}; the file was made for another model")
        update = update.reshape(weight.shape)
        scale = self.tensors.get("dora_scale")
        if scale is None:
            # Computed in fp32 whatever the file's precision, then added once: no fp16 rounding of small updates.
            return update * strength
        return (dora_weight(weight.float(), update, scale.float()) - weight.float()) * strength


def dora_weight(weight: torch.Tensor, update: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m · (W + ΔW) / ‖W + ΔW‖ on the axis ``scale``'s shape names (LyCORIS's convention:
    ``(out, 1, …)`` normalises output rows, ``(1, in, …)`` input columns)."""
    merged = weight + update
    out = merged.shape[0]
    if scale.shape[0] == out and scale.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *[1] * (merged.dim() - 1))
        return merged * (scale.reshape(out, *[1] * (merged.dim() - 1)) / norm)
    cols = merged.shape[1]
    if scale.numel() == cols:
        norm = merged.transpose(0, 1).reshape(cols, -1).norm(dim=1).reshape(1, cols, *[1] * (merged.dim() - 2))
        return merged * (scale.reshape(1, cols, *[1] * (merged.dim() - 2)) / norm)
    raise AdapterFileError(f"dora_scale of shape {tuple(scale.shape)} fits neither axis of a {tuple(weight.shape)} weight")
