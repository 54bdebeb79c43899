"""Turn what went wrong into a sentence a person can act on: the likely cause and what to change."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from studio.engine.config import Job, Problem


class TrainingError(Exception):
    """An expected failure whose message is already written for people."""


class JobInvalid(TrainingError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"The job has {len(problems)} problem(s) to fix before training:\n{lines}")


class NoUsableImages(TrainingError):
    def __init__(self, path: str, report: Any):
        worst = "; ".join(f"{i.file}: {i.problem}" for i in report.issues[:5])
        super().__init__(
            f"No usable images in '{path}'. Add .png/.jpg/.webp/.bmp images (with same-name .txt captions)"
            + (f". Problems found: {worst}" if worst else "")
        )


class NothingToResume(TrainingError):
    def __init__(self, run_dir: Path):
        super().__init__(
            f"'{run_dir}' has no complete checkpoint to resume from; start a new run, or set output.save_every "
            "so future runs can be resumed"
        )


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, job: Job, last_good: Path | None):
        causes = [f"the learning rate ({job.training.lr:g}) is too high — try a tenth of it"]
        if job.training.mixed_precision == "fp16":
            causes.append("fp16 overflows — use bf16 or 'no' for training.mixed_precision")
        causes.append("a broken image or base model — check the dataset report and the model")
        kept = f" The last good LoRA is kept at {last_good}." if last_good else (
            " No LoRA was saved before this; set output.save_every to keep intermediate ones.")
        super().__init__(f"Training stopped at step {step}: the loss became NaN/infinite. Likely causes: "
                         + "; ".join(causes) + "." + kept)
        self.step = step


def explain(exc: BaseException, job: Job) -> str:
    """A readable message for any exception the engine raises."""
    if isinstance(exc, TrainingError):
        return str(exc)
    name = type(exc).__name__
    from studio.engine.checkpoint import ModelLoadError
    from studio.engine.optim import OptimizerUnavailable

    if isinstance(exc, (ModelLoadError, OptimizerUnavailable)):
        return str(exc)
    if _is_oom(exc):
        t, d = job.training, job.dataset
        advice = [f"lower training.batch_size (now {t.batch_size})" if t.batch_size > 1 else None,
                  None if t.gradient_checkpointing else "turn on training.gradient_checkpointing",
                  f"lower dataset.resolution (now {d.resolution})",
                  None if t.cache_latents else "turn on training.cache_latents",
                  "close other programs using the GPU"]
        return ("The GPU ran out of memory. To fit: " + "; ".join(a for a in advice if a)
                + ". The last checkpoint (if any) is kept; resume with --resume after changing the job.")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full ({exc.filename or 'output folder'}). Free some space or choose another output folder; no partial file was left."
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES)):
        return f"Cannot write to '{exc.filename or job.output.dir}' (read-only or no permission). Choose another output folder."
    if isinstance(exc, OSError):
        return f"A file could not be read or written: {exc}. Check the path and try again."
    return f"Training failed with an unexpected error ({name}: {exc}). The log has the details; please report it."


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
