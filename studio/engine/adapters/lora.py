"""LoRA (peft LoraConfig): kohya's ``lora_down``/``lora_up``/``alpha`` per module, ΔW = up @ down × alpha / rank."""

from __future__ import annotations

from typing import Any

import torch

from studio.engine.adapters.base import ADAPTER_NAME, Adapter, AdapterFileError, FileModule, targets


class LoraAdapter(Adapter):
    name = "lora"
    label = "LoRA"
    use_dora = False
    file_keys = ("lora_down.weight", "lora_up.weight")

    def peft_config(self, lora, family, component, model) -> Any:
        from peft import LoraConfig

        found = targets(lora, family, component, model)
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            use_dora=self.use_dora,
            target_modules=found.pattern,
            rank_pattern=found.rank_pattern,
            alpha_pattern=found.alpha_pattern,
            # kohya's initialisation: A kaiming-uniform, B zero, so the untrained LoRA changes nothing.
            init_lora_weights=True,
        )

    def owns_layer(self, layer) -> bool:
        from peft.tuners.lora import LoraLayer

        return (isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A
                and bool(layer.use_dora.get(ADAPTER_NAME, False)) == self.use_dora)

    def export_tensors(self, layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if getattr(layer, "use_rslora", {}).get(ADAPTER_NAME, False):
            raise ValueError("rank-stabilised LoRA (scale alpha/√rank) has no kohya equivalent")
        return {
            "lora_down.weight": layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", dtype).contiguous(),
            "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", dtype).contiguous(),
            # fp32 scalar, whatever the save dtype: alphas like 0.3 must not be rounded to fp16.
            "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER_NAME]), dtype=torch.float32),
        }

    def export_suffixes(self, layer) -> list[str]:
        return ["lora_down.weight", "lora_up.weight", "alpha"] + (["dora_scale"] if self.use_dora else [])

    def low_rank_update(self, layer) -> torch.Tensor:
        """scaling · B @ A in the base weight's shape (fp32)."""
        base = layer.get_base_layer().weight
        down = layer.lora_A[ADAPTER_NAME].weight.float().flatten(1)
        up = layer.lora_B[ADAPTER_NAME].weight.float().flatten(1)
        return ((up @ down) * layer.scaling[ADAPTER_NAME]).reshape(base.shape)

    def trained_delta(self, layer) -> torch.Tensor:
        return self.low_rank_update(layer)

    # ------------------------------------------------------------------------------------------ file side

    def file_module(self, name: str, tensors: dict[str, torch.Tensor]) -> FileModule:
        if "lora_mid.weight" in tensors:
            raise AdapterFileError(f"module {name} uses LoCon's Tucker (lora_mid) decomposition, which LoRA Studio "
                                   "cannot apply")
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None or up is None:
            raise AdapterFileError(f"module {name} lacks its lora_down or lora_up weight; the file is incomplete")
        if up.flatten(1).shape[1] != down.shape[0]:
            raise AdapterFileError(f"module {name}: lora_up has {up.flatten(1).shape[1]} columns but lora_down has "
                                   f"{down.shape[0]} rows (rank); the factors do not belong together")
        # kohya's convention: a module without .alpha is not scaled (alpha = rank).
        alpha = float(tensors["alpha"].float().item()) if "alpha" in tensors else float(down.shape[0])
        return FileModule(name, self, tensors, alpha)

    def file_rank(self, module: FileModule) -> int:
        return int(module.tensors["lora_down.weight"].shape[0])

    def file_update(self, module: FileModule) -> torch.Tensor:
        down = module.tensors["lora_down.weight"].float().flatten(1)
        up = module.tensors["lora_up.weight"].float().flatten(1)
        return (up @ down) * (module.alpha / down.shape[0])


LORA = LoraAdapter()
