"""DoRA (peft use_dora): LoRA plus a magnitude per output row, written as LyCORIS's ``dora_scale`` (wd_on_out)."""

# peft's DoRA trains W' = m · (W + s·B@A) / ‖W + s·B@A‖ with the norm over each *output row*. That is LyCORIS's
# ``wd_on_out=True`` decomposition, so the file carries ``dora_scale`` of shape (out, 1[, 1, 1]) holding m, and
# LyCORIS's own loader reproduces the trained weight exactly. Consumers differ (adapters/consumers.py says
# which load it faithfully; the export report shows it): ComfyUI/Forge detect the output axis by shape but divide
# by ‖W‖ instead of ‖W + ΔW‖; A1111's Lora extension only implements the input-column decomposition. For
# ComfyUI/Forge a file can be made exact for one base model by writing m·‖W‖/‖W + ΔW‖ instead (dora_target).

from __future__ import annotations

import torch

from studio.engine.adapters.base import ADAPTER_NAME
from studio.engine.adapters.lora import LoraAdapter


def _rows(weight: torch.Tensor) -> tuple[int, ...]:
    return (weight.shape[0], *[1] * (weight.dim() - 1))


class DoraAdapter(LoraAdapter):
    name = "dora"
    label = "DoRA"
    use_dora = True
    network_module = "lycoris.kohya"
    algo = "locon"

    def magnitude(self, layer) -> torch.Tensor:
        base = layer.get_base_layer().weight
        return layer.lora_magnitude_vector[ADAPTER_NAME].weight.detach().float().reshape(_rows(base))

    def trained_delta(self, layer) -> torch.Tensor:
        weight = layer.get_base_layer().weight.detach().float()
        merged = weight + self.low_rank_update(layer)
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(_rows(merged))
        return merged * (self.magnitude(layer) / norm) - weight

    def export_tensors(self, layer, dtype: torch.dtype, *, target: str = "lycoris") -> dict[str, torch.Tensor]:
        out = super().export_tensors(layer, dtype)
        scale = self.magnitude(layer)
        if target == "comfyui":
            # ComfyUI/Forge compute (W + ΔW) · dora_scale / ‖W‖ on the output axis (comfy/weight_adapter/base.py,
            # weight_decompose): pre-multiplying by ‖W‖/‖W + ΔW‖ makes their result the trained weight on this base.
            weight = layer.get_base_layer().weight.detach().float()
            merged = weight + self.low_rank_update(layer)
            scale = scale * (weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(_rows(weight))
                             / merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(_rows(weight)))
        # fp32 like alpha: the magnitudes are divided by a norm of similar size, fp16 would cost 1e-3 relative.
        out["dora_scale"] = scale.to("cpu", torch.float32).contiguous()
        return out

    def network_args(self, lora) -> dict[str, str]:
        args = {"algo": "locon", "dora_wd": "True", "wd_on_output": "True"}
        if lora.targets == "+conv":
            args.update(conv_dim=str(lora.conv_rank or lora.rank), conv_alpha=str(float(lora.conv_alpha or lora.alpha)))
        return args


DORA = DoraAdapter()
