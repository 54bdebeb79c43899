"""Resumable training state: saved atomically every N steps and on stop/pause/failure, loaded for exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from studio.engine.config import Job, dumps_job
from studio.engine.runs import (  # noqa: F401  (re-exported: the path helpers live in torch-free runs.py)
    JOB_FILE, LORA_FILE, META_FILE, STATE_FILE, checkpoint_dir, checkpoint_meta, latest_checkpoint, list_checkpoints,
)


@dataclass
class TrainPosition:
    """Where training is: optimizer steps done and the next batch of the deterministic data order."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0


def rng_state() -> dict[str, Any]:
    """Every RNG the process has. The trainer reseeds from (seed, step) anyway; this is the belt to those braces."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def all_finite(lora: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether every LoRA tensor is finite, with one host sync per device rather than one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for sd in lora.values():
        for t in sd.values():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _write_synced(path: Path, writer: Callable[[Path], None]) -> None:
    writer(path)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened there; renames are durable without it
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    position: TrainPosition,
    lora: dict[str, dict[str, torch.Tensor]],
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    keep_last: int = 3,
    *,
    job: Job | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``step-NNNNNN/`` (LoRA weights, optimizer/scheduler/scaler/RNG/position, meta.json, job.toml).

    Everything goes into a hidden temporary folder first; each file is fsynced, then the folder is renamed to
    its final name in one step. A crash or a full disk at any point leaves either the complete checkpoint or
    nothing under ``step-NNNNNN`` (the temporary folder is removed on errors, or on the next resume after a
    kill). Older checkpoints beyond ``keep_last`` are pruned only after the new one is in place.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, position.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
    try:
        flat = {f"{component}/{key}": t.detach().to("cpu").contiguous()
                for component, sd in lora.items() for key, t in sd.items()}
        _write_synced(tmp / LORA_FILE, lambda p: save_file(flat, str(p)))
        state = {
            "position": vars(position).copy(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        }
        _write_synced(tmp / STATE_FILE, lambda p: torch.save(state, p))
        info = {"step": position.step, "epoch": position.epoch, "batch_index": position.batch_index, **(meta or {})}
        _write_synced(tmp / META_FILE, lambda p: p.write_text(json.dumps(info, indent=1), encoding="utf-8"))
        if job is not None:
            _write_synced(tmp / JOB_FILE, lambda p: p.write_text(dumps_job(job), encoding="utf-8"))
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a checkpoint is as readable as the run
        if final.exists():  # saved again at the same step (e.g. after a failed export): swap, never mix
            old = final.with_name(f".{final.name}.replaced.partial")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def load_checkpoint(folder: Path) -> tuple[TrainPosition, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint back: position, LoRA state dicts per component, and the rest of the state."""
    flat = load_file(Path(folder) / LORA_FILE)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        component, name = key.split("/", 1)
        lora.setdefault(component, {})[name] = tensor
    # Our own file, but still read without running code: numpy RNG state needs its types allowed.
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    state["meta"] = checkpoint_meta(folder)
    return TrainPosition(**state["position"]), lora, state


def _numpy_rng_globals() -> list[Any]:
    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed.append(_reconstruct)
    return allowed


def remove_partials(root: Path) -> None:
    """Temporary checkpoint folders a killed process left behind."""
    if Path(root).is_dir():
        for child in Path(root).iterdir():
            if child.name.startswith(".") and ".partial" in child.name:
                with contextlib.suppress(OSError):
                    shutil.rmtree(child)
