"""Turn what went wrong into a sentence a person can act on: the likely cause, what to change, what was kept."""

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


class ResumeRefused(TrainingError):
    def __init__(self, run_dir: Path, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Cannot resume the run in '{run_dir}':\n{lines}")


class NoUsableImages(TrainingError):
    def __init__(self, path: str, report: Any):
        worst = "; ".join(f"{i.file}: {i.problem}" for i in report.issues[:5])
        super().__init__(
            f"No usable images in '{path}'. Add .png/.jpg/.webp/.bmp images (with same-name .txt captions)"
            + (f". Problems found: {worst}" if worst else "")
        )


class RunInUse(TrainingError):
    """Another process holds the run folder's lock: two processes writing one run would destroy each other's files."""

    def __init__(self, run_dir: Path):
        super().__init__(
            f"The run in '{run_dir}' is being trained by another LoRA Studio process right now (a window or a "
            "`lora-studio train` elsewhere). Let that one finish or stop it first; two at once would overwrite "
            "each other's files. To train something else meanwhile, start a new run in another folder."
        )


class CheckpointDamaged(TrainingError):
    """No checkpoint of the run can be resumed from; the message lists each and what is wrong with it."""

    def __init__(self, run_dir: Path, reasons: list[str]):
        super().__init__(
            f"Cannot resume the run in '{run_dir}': " + " ".join(reasons)
            + " Nothing was changed; start a new run (the run's samples and LoRA files stay where they are)."
        )


class NothingToResume(TrainingError):
    def __init__(self, run_dir: Path):
        super().__init__(
            f"'{run_dir}' has no complete checkpoint to resume from; start a new run, or set output.save_every "
            "so future runs can be resumed"
        )


def _kept(last_good: Path | None, checkpoint: Path | None, run_dir: Path | None) -> str:
    if last_good or checkpoint:
        where = f" The last good LoRA is kept at {last_good}." if last_good else ""
        if checkpoint and run_dir:
            where += (f" Its training state ({checkpoint.name}) is kept too: after changing the job, continue with "
                      f"`lora-studio train --resume {run_dir}`.")
        return where
    return " Nothing was saved before this; set output.save_every to keep intermediate LoRAs and checkpoints."


def _vae_hint(*families: Any) -> str:
    """What the family knows about its VAE overflowing ("" when nothing), for the loaded or the configured family."""
    from studio.engine.families import get_family, names

    for family in families:
        if family and (not isinstance(family, str) or family in names()):
            hint = get_family(family).vae_overflow_hint
            if hint:
                return hint
    return ""


class NonFiniteLoss(TrainingError):
    """The loss (or the gradients, or the weights) became NaN/inf; nothing after the last good state is kept."""

    def __init__(self, step: int, job: Job, last_good: Path | None, *, what: str = "the loss",
                 checkpoint: Path | None = None, run_dir: Path | None = None, family: Any = None):
        t = job.training
        causes = [f"the learning rate ({t.lr:g}) is too high — try a tenth of it (training.lr)"]
        if t.mixed_precision == "fp16":
            causes.append("fp16 overflows — use bf16, or 'no', for training.mixed_precision")
        hint = _vae_hint(family, job.model.family)
        if hint:
            causes.append(hint)
        if job.lora.alpha > 2 * job.lora.rank:
            causes.append(f"lora.alpha ({job.lora.alpha:g}) far above lora.rank ({job.lora.rank}) scales updates up")
        causes.append("a broken image or base model — check the dataset report and the model")
        super().__init__(f"Training stopped at step {step}: {what} became NaN/infinite. Likely causes: "
                         + "; ".join(causes) + "." + _kept(last_good, checkpoint, run_dir))
        self.step = step


class NonFiniteLatent(TrainingError):
    def __init__(self, image: str, family: Any = None):
        hint = _vae_hint(family)
        hint = f" {hint[0].upper()}{hint[1:]}." if hint else " The VAE (model.vae, or the checkpoint's own) is probably damaged."
        super().__init__(f"The VAE turned '{image}' into NaN/infinite latents.{hint}")


class OutOfMemory(TrainingError):
    """Out of (GPU) memory; the message says how to fit and whether the state of the last step was kept."""

    def __init__(self, job: Job, *, step: int, checkpoint: Path | None, last_good: Path | None,
                 run_dir: Path | None, during: str, saved_step: int | None = None):
        t, d = job.training, job.dataset
        advice = [f"lower training.batch_size (now {t.batch_size}; raise training.gradient_accumulation to keep the "
                  "effective batch)" if t.batch_size > 1 else None,
                  None if t.gradient_checkpointing else "turn on training.gradient_checkpointing",
                  f"lower dataset.resolution (now {d.resolution})",
                  None if t.cache_latents else "turn on training.cache_latents",
                  "train the UNet only (lora.train_text_encoder = false)" if job.lora.train_text_encoder else None,
                  "close other programs using the GPU"]
        text = (f"The GPU ran out of memory {during or 'during training'}"
                + (f" after {step} completed step(s)" if step else "") + ". To fit: " + "; ".join(a for a in advice if a) + ".")
        if checkpoint and run_dir:
            # Only settings that leave the saved state valid may change on resume (runs.MUST_MATCH).
            example = "" if t.gradient_checkpointing else " --set training.gradient_checkpointing=true"
            text += (f" The state after step {step if saved_step is None else saved_step} is saved ({checkpoint.name}): "
                     f"continue with `lora-studio train --resume {run_dir}{example}`; gradient checkpointing and "
                     "caching can change on resume, batch size and resolution need a new run.")
        elif last_good:
            text += f" The last good LoRA is kept at {last_good}."
        super().__init__(text)


PHASES = {
    "setup": "while starting the run",
    "loading": "while loading the model",
    "scanning": "while scanning the dataset",
    "caching": "while caching latents and text embeddings",
    "training": "during a training step",
    "optimizer": "during an optimizer step",
    "sampling": "while making preview images",
    "saving": "while saving a checkpoint",
    "exporting": "while writing the LoRA file",
}


# Phases in which the run writes files: a failure there may be the disk's even when the writer lost the errno.
_WRITING = ("saving", "exporting", "sampling", "setup")


def explain(exc: BaseException, job: Job, phase: str = "") -> str:
    """A readable message for any exception the engine raises."""
    if isinstance(exc, TrainingError):
        return str(exc)
    name = type(exc).__name__
    during = PHASES.get(phase, "")
    from studio.engine.checkpoint import ModelLoadError
    from studio.engine.fileio import is_disk_full
    from studio.engine.jsonfile import JsonFileError
    from studio.engine.optim import OptimizerUnavailable

    if isinstance(exc, (ModelLoadError, OptimizerUnavailable, JsonFileError)):
        return str(exc)
    if is_oom(exc):
        return str(OutOfMemory(job, step=0, checkpoint=None, last_good=None, run_dir=None, during=during or "").args[0])
    out = Path(job.output.dir).expanduser() if job.output.dir.strip() else None
    if is_disk_full(exc, out if phase in _WRITING else None):
        where = getattr(exc, "filename", None) or job.output.dir or "the output folder"
        return (f"The disk is full{' ' + during if during else ''} ({where}). "
                "Free some space or choose another output folder; no partial file was left.")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
        return (f"Cannot write to '{exc.filename or job.output.dir}' (read-only or no permission)"
                f"{' ' + during if during else ''}. Choose another output folder; no partial file was left.")
    if isinstance(exc, OSError):
        return f"A file could not be read or written{' ' + during if during else ''}: {exc}. Check the path and try again."
    if type(exc).__name__ == "SafetensorError":  # safetensors' own: a file that is not what its name says
        return (f"A .safetensors file could not be read{' ' + during if during else ''} ({exc}); it is damaged or "
                "not a safetensors file (e.g. a renamed .ckpt). Replace it, or check the model and VAE paths.")
    where = f" {during}" if during else ""
    return f"Training failed{where} with an unexpected error ({name}: {exc}). The log has the details; please report it."


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


_is_oom = is_oom  # the earlier private name
