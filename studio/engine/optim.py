"""The optimizers a job can choose, each with the options that make it behave for LoRA training."""

from __future__ import annotations

from typing import Any

import torch

from studio.engine.config import Job


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer cannot run here; the message names the alternative."""


def param_groups(params: dict[str, list[torch.nn.Parameter]], job: Job) -> list[dict[str, Any]]:
    groups = []
    for component, ps in params.items():
        if not ps:
            continue
        # Text encoders have the component names "text_encoder…"; the denoiser ("unet", "transformer") the main lr.
        lr = job.lora.text_encoder_lr if component.startswith("text_encoder") else job.training.lr
        groups.append({"params": ps, "lr": lr, "name": component})
    return groups


# Devices where torch's fused AdamW kernel exists (CPU since torch 2.4). Elsewhere foreach is the fast path.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw_kernel_options(device: torch.device, fast: bool) -> dict[str, bool]:
    """AdamW's implementation switch: one fused kernel (or a few foreach launches) for all LoRA tensors
    instead of ~10 small ops per tensor; SD1.5 has ~800 LoRA tensors, so the per-tensor loop is launch-bound."""
    if not fast:
        return {"foreach": False, "fused": False}
    if device.type in FUSED_ADAMW_DEVICES:
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(params: dict[str, list[torch.nn.Parameter]], job: Job, device: torch.device) -> torch.optim.Optimizer:
    t = job.training
    groups = param_groups(params, job)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                 **adamw_kernel_options(device, t.fused_optimizer))
    if t.optimizer == "adamw8bit":
        # bitsandbytes' 8-bit states are CUDA kernels; a silent fallback would change the optimizer's behaviour.
        if device.type != "cuda":
            raise OptimizerUnavailable(
                f"8-bit AdamW needs an NVIDIA GPU with CUDA, and this run is on the {device.type.upper()}; "
                "set training.optimizer to 'adamw'"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise OptimizerUnavailable(
                "8-bit AdamW needs the bitsandbytes package (pip install bitsandbytes); or set training.optimizer "
                "to 'adamw'"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(0.9, 0.999), weight_decay=1e-2)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=t.lr, weight_decay=1e-2, safeguard_warmup=t.warmup_steps > 0, use_bias_correction=True)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate: Adafactor's relative-step mode ignores the job's lr and schedule.
        return Adafactor(groups, lr=t.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    raise OptimizerUnavailable(f"unknown optimizer '{t.optimizer}'")
