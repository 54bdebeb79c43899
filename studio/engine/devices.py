"""Which device trains, in which precision, described for people ("NVIDIA H100, 79.2 GB")."""

from __future__ import annotations

import os

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(requested)


def device_problem(requested: str) -> str | None:
    """Why the job's ``training.device`` cannot be used on this machine, as a sentence; None when it can."""
    if requested == "cuda" and not torch.cuda.is_available():
        return ("training.device is 'cuda' but no NVIDIA GPU is usable here (none found, or this PyTorch was built "
                "without CUDA); choose 'auto' or 'cpu'")
    if requested == "mps" and not torch.backends.mps.is_available():
        return "training.device is 'mps' but no Apple GPU (Metal) is available here; choose 'auto' or 'cpu'"
    return None


def resolve_precision(requested: str, cpu: bool) -> str:
    """accelerate's mixed_precision value for the job's choice ('auto' → bf16/fp16 on GPUs, fp32 on the CPU)."""
    if requested != "auto":
        return requested
    if cpu:
        return "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp16"  # Apple MPS


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def describe_device(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {format_bytes(props.total_memory)}"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({os.cpu_count()} threads)"


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """TF32 for fp32 matrix products and convolutions on a CUDA GPU that has it (compute capability 8.0, Ampere, and
    newer); returns whether it is on. Process-wide in PyTorch, so it is set both ways for every CUDA run (the app
    trains several jobs in one process). Elsewhere nothing changes, so CPU results stay exactly as they were."""
    if device.type != "cuda":
        return False
    on = bool(enabled) and torch.cuda.get_device_capability(device)[0] >= 8
    torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    return on
