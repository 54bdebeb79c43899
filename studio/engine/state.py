"""Resumable training state: saved atomically every N steps and on stop/pause/failure, loaded for exact resume."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from studio.engine import fileio
from studio.engine.config import Job, dumps_job
from studio.engine.failures import CheckpointDamaged
from studio.engine.runs import (  # noqa: F401  (re-exported: the path helpers live in torch-free runs.py)
    JOB_FILE, LORA_FILE, MANIFEST_FILE, META_FILE, STATE_FILE, checkpoint_dir, checkpoint_meta, checkpoint_problem,
    latest_checkpoint, list_checkpoints, resume_point, set_aside, skipped_note, write_manifest,
)

log = logging.getLogger(__name__)


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
    """Write ``step-NNNNNN/`` (LoRA weights, optimizer/scheduler/scaler/RNG/position, meta.json, job.toml, and
    last manifest.json with each file's size and sha256).

    Everything goes into a hidden temporary folder first; each file is fsynced, then the folder is renamed to
    its final name in one step. A crash or a full disk at any point leaves either the complete checkpoint or
    nothing under ``step-NNNNNN`` (the temporary folder is removed on errors, or on the next resume after a
    kill). Older checkpoints beyond ``keep_last`` are pruned only after the new one is in place. A write that
    failed for want of space raises fileio.DiskFullError, whatever safetensors or torch.save raised.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, position.step)
    tmp = fileio.create_temp_dir(root, final.name)  # mode from the umask, as a plain mkdir gives
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
        # "manifest" tells a resume that a missing manifest.json means damage, not an older version's checkpoint.
        info = {"step": position.step, "epoch": position.epoch, "batch_index": position.batch_index, **(meta or {}),
                "manifest": MANIFEST_FILE}
        _write_synced(tmp / META_FILE, lambda p: p.write_text(json.dumps(info, indent=1), encoding="utf-8"))
        names = [LORA_FILE, STATE_FILE, META_FILE]
        if job is not None:
            _write_synced(tmp / JOB_FILE, lambda p: p.write_text(dumps_job(job), encoding="utf-8"))
            names.append(JOB_FILE)
        write_manifest(tmp, names)  # last: its presence means every file above is complete
        _fsync_dir(tmp)
        if final.exists():  # saved again at the same step (e.g. after a failed export): swap, never mix
            old = final.with_name(f".{final.name}.replaced.partial")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        full = fileio.is_disk_full(exc, root)  # before the partial folder is removed: it still takes its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not isinstance(exc, fileio.DiskFullError):
            raise fileio.DiskFullError(final, exc) from exc
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[TrainPosition, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint back: position, LoRA state dicts per component, and the rest of the state.

    Raises CheckpointDamaged (a sentence naming the checkpoint and the file) when it cannot be read or holds
    non-finite weights.
    """
    folder = Path(folder)
    try:
        flat = load_file(folder / LORA_FILE)
        lora: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            component, name = key.split("/", 1)
            lora.setdefault(component, {})[name] = tensor
    except Exception as exc:
        raise CheckpointDamaged(folder.parent.parent, [f"{folder.name}/{LORA_FILE} cannot be read ({exc})."]) from exc
    if not all_finite(lora):
        raise CheckpointDamaged(folder.parent.parent, [f"{folder.name}/{LORA_FILE} holds NaN or infinite weights."])
    try:
        # Our own file, but still read without running code: numpy RNG state needs its types allowed.
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        position = TrainPosition(**state["position"])
    except Exception as exc:
        raise CheckpointDamaged(folder.parent.parent, [f"{folder.name}/{STATE_FILE} cannot be read ({exc})."]) from exc
    state["meta"] = checkpoint_meta(folder)
    return position, lora, state


def resume_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume continues from, verified; damaged newer ones are moved aside, with a note for each.

    Checkpoints with a manifest are verified file by file against their sha256; older ones (no manifest) by
    their formats' own structure and CRCs, since nothing else records what was written, and a note says so.
    If none can be used, raises CheckpointDamaged listing each; nothing is moved then. Returns (None, []) when
    there is no checkpoint at all.
    """
    root = Path(root)
    chosen, skipped = resume_point(root, thorough=True)
    if chosen is None:
        if skipped:
            raise CheckpointDamaged(root.parent, [skipped_note(s, None) for s in skipped])
        return None, []
    notes = []
    for skip in skipped:
        moved = set_aside(skip.folder)
        log.warning("checkpoint %s is damaged (%s); moved to %s", skip.folder, skip.reason, moved)
        notes.append(skipped_note(skip, chosen, moved))
    if not (chosen / MANIFEST_FILE).exists():
        notes.append(f"Checkpoint {chosen.name} was saved by an earlier version without checksums: its files were "
                     "checked for completeness and their own CRCs only, not against what was written.")
    return chosen, notes


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
