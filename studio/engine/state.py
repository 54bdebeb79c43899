"""Resumable training state: saved atomically every N steps and on stop/pause, loaded for exact resume."""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from studio.engine.fileio import atomic_write_with

STATE_FILE = "state.pt"
LORA_FILE = "lora.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainPosition:
    """Where training is: optimizer steps done and the next batch of the deterministic data order."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (both files present), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and (child / LORA_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    position: TrainPosition,
    lora: dict[str, dict[str, torch.Tensor]],
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    keep_last: int = 3,
) -> Path:
    """Write ``step-NNNNNN/`` (LoRA weights + optimizer/scheduler/scaler/RNG/position); prune to ``keep_last``.

    The state file is written last, and a checkpoint counts only when both files exist, so a crash mid-write
    leaves the previous checkpoint as the latest one.
    """
    folder = checkpoint_dir(root, position.step)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{component}/{key}": t.detach().to("cpu").contiguous() for component, sd in lora.items() for key, t in sd.items()}
    atomic_write_with(folder / LORA_FILE, lambda tmp: save_file(flat, str(tmp)))
    state = {
        "position": vars(position).copy(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
    }
    atomic_write_with(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path) -> tuple[TrainPosition, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint back: position, LoRA state dicts per component, and the rest of the state."""
    flat = load_file(folder / LORA_FILE)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        component, name = key.split("/", 1)
        lora.setdefault(component, {})[name] = tensor
    # Our own file, but still read without running code: numpy RNG state needs its types allowed.
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return TrainPosition(**state["position"]), lora, state


def _numpy_rng_globals() -> list[Any]:
    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed.append(_reconstruct)
    return allowed
