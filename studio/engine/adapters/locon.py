"""LoCon: LoRA on the ResNet convolutions too (kohya's networks.lora with conv_dim); the tensors are LoRA's."""

from __future__ import annotations

from studio.engine.adapters.lora import LoraAdapter


class LoconAdapter(LoraAdapter):
    # Per layer a LoCon module is a LoRA module (k x k convs get their own rank/alpha through the targets); the
    # type exists so the job, the metadata and the pages name what was trained.
    name = "locon"
    label = "LoCon (LoRA + convolutions)"

    def owns_layer(self, layer) -> bool:
        return False  # its layers are LoRA layers; LORA owns them


LOCON = LoconAdapter()
