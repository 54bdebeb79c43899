"""Resume, rescue and the sentence a failure owes the user; the checkpoints and LoRA files they rely on."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any

import torch

from studio.engine import failures
from studio.engine.config import Problem
from studio.engine.run_state import Run
from studio.engine.runs import RunFolder, detach_log_file
from studio.engine.state import all_finite, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state

log = logging.getLogger(__name__)


def restore(run: Run) -> None:
    """Load the latest checkpoint into the freshly built run: weights, optimizer, schedule, scaler, RNG, position."""
    from studio.engine.lora import load_lora_state_dicts
    from studio.engine.optim import param_groups

    folder = latest_checkpoint(run.folder.checkpoints)
    if folder is None:
        raise failures.NothingToResume(run.folder.root)
    position, lora, state = load_checkpoint(folder)
    if position.step > run.total_steps:
        raise failures.ResumeRefused(run.folder.root, [Problem(
            "training.steps", f"the last checkpoint is at step {position.step}, past the {run.total_steps} steps the "
            "job plans; set more steps to continue")])
    load_lora_state_dicts(run.bundle, lora)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])  # each step reseeds from (seed, step) anyway; this keeps anything else in step too
    # A learning rate changed on resume applies from here on; the loaded state would otherwise keep the old one.
    wanted = [g["lr"] for g in param_groups(run.params, run.job)]
    sched = run.scheduler
    if len(wanted) == len(sched.base_lrs) and wanted != list(sched.base_lrs) and hasattr(sched, "lr_lambdas"):
        for i, (group, lr) in enumerate(zip(run.optimizer.param_groups, wanted)):
            sched.base_lrs[i] = group["initial_lr"] = lr
            group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
        sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    run.position = position
    run.elapsed_before = float(state.get("meta", {}).get("elapsed", 0.0))
    if run.job.sampling.every < 0 and isinstance(state.get("meta", {}).get("sample_every"), int):
        run.sample_every = state["meta"]["sample_every"]  # 'auto' keeps the cadence the run started with
    run.saved_step, run.checkpoint = position.step, folder
    previous = run.folder.lora_path(run.job.output.name, position.step)
    if previous.is_file():
        run.lora_path = previous


def write_checkpoint(run: Run) -> tuple[Path, Path]:
    """Intermediate LoRA first, then the checkpoint, which is the commit point a resume starts from."""
    from studio.engine.lora import lora_state_dicts

    run.phase = "saving"
    lora = lora_state_dicts(run.bundle)
    if not all_finite(lora):
        raise failures.NonFiniteLoss(run.step, run.job, run.lora_path, what="the LoRA weights",
                                     checkpoint=run.checkpoint, run_dir=run.run_dir, family=run.bundle.family)
    run.phase = "exporting"
    lora_path = export_lora_file(run, final=False)
    run.folder.prune_intermediate_loras(run.job.output.name, run.job.output.keep_last_loras)
    run.phase = "saving"
    started = run.started if run.started is not None else time.perf_counter()
    meta = {"total_steps": run.total_steps, "elapsed": time.perf_counter() - started, "sample_every": run.sample_every}
    folder = save_checkpoint(run.folder.checkpoints, run.position, lora, run.optimizer, run.scheduler,
                             getattr(run.accelerator, "scaler", None), run.job.output.keep_last, job=run.job, meta=meta)
    run.lora_path, run.checkpoint, run.saved_step = lora_path, folder, run.step
    run.phase = "training"
    return folder, lora_path


def check_finite_weights(run: Run) -> None:
    """Before the final export: a LoRA with NaN/inf weights is never written."""
    from studio.engine.lora import lora_state_dicts

    if run.is_main and not all_finite(lora_state_dicts(run.bundle)):
        raise failures.NonFiniteLoss(run.step, run.job, run.lora_path, what="the LoRA weights",
                                     checkpoint=run.checkpoint, run_dir=run.run_dir, family=run.bundle.family)


def export_lora_file(run: Run, *, final: bool) -> Path:
    """Write the LoRA file (main process only; callers hold the barriers)."""
    from studio.engine.export import export_diffusers_lora, export_lora, kohya_export_problem

    path = run.folder.lora_path(run.job.output.name, None if final else run.position.step)
    if run.is_main:
        if kohya_export_problem(run.bundle):
            # An adapter with no kohya/LyCORIS form (none today; preflight refuses such jobs unless diffusers is
            # asked for): only the diffusers/PEFT layout reproduces it.
            export_diffusers_lora(run.bundle, path)
            return path
        export_lora(run.bundle, run.job, path, steps=run.position.step, tag_frequency=run.report.tag_frequency(),
                    dtype=run.job.output.save_dtype)
        if final and run.job.output.save_diffusers:
            export_diffusers_lora(run.bundle, path.with_name(path.stem + "-diffusers.safetensors"))
    return path


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def failure_message(exc: BaseException, run: Run, unsaved: Any = None) -> str:
    """The sentence for RunFailed; first saves the last completed step when that is safe, so nothing is lost.

    ``unsaved`` (keep_unsaved's result) is the trained LoRA the disk would not take, still in memory.
    """
    phase = run.phase
    saved = rescue(exc, run)
    run_dir = run.run_dir
    if unsaved is not None:
        from studio.engine.unsaved import describe_size

        return (failures.explain(exc, run.job, phase) + f" The trained LoRA (step {unsaved.step}, "
                f"{describe_size(unsaved.size)}) is kept in memory: save it to another disk or folder now.")
    if failures.is_oom(exc) and run.report is not None:
        return str(failures.OutOfMemory(run.job, step=run.step, checkpoint=run.checkpoint, last_good=run.lora_path,
                                        run_dir=run_dir, during=failures.PHASES.get(phase, ""),
                                        saved_step=run.saved_step))
    message = failures.explain(exc, run.job, phase)
    if saved is not None:
        message += (f" The training state after step {run.step} is saved ({saved.name}); after fixing the "
                    f"cause, continue with `lora-studio train --resume {run_dir}`")
        message += " (add --sample-every 0 to train without previews)." if phase == "sampling" else "."
    return message


def keep_unsaved(exc: BaseException, run: Run) -> Any:
    """After a write failed for want of space (or permission), the trained LoRA as the bytes of its file, in
    memory (studio.engine.unsaved.UnsavedLora), so the user can save it elsewhere; None when there is nothing
    trained to keep or the failure was not the disk's.

    rescue() cannot help here: a checkpoint on the same disk would fail the same way.
    """
    from studio.engine.fileio import is_disk_full
    from studio.engine.lora import lora_state_dicts
    from studio.engine.unsaved import UnsavedLora

    if run.bundle is None or not run.params or not run.is_main or run.step == 0 or not run.consistent:
        return None
    disk = isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS
    if not disk and not (run.phase in ("saving", "exporting") and is_disk_full(exc, run.run_dir)):
        return None
    if not all_finite(lora_state_dicts(run.bundle)):
        return None
    path = run.folder.lora_path(run.job.output.name, None)
    chunks = lora_file_chunks(run)
    log.info("kept the trained LoRA of step %d in memory (%s could not be written)", run.step, path)
    return UnsavedLora(name=path.name, step=run.step, meant_for=path.parent, chunks=tuple(chunks))


def lora_file_chunks(run: Run) -> list:
    """The bytes of the final LoRA file as export_lora_file would write it."""
    from studio.engine.export import diffusers_lora_chunks, kohya_export_problem
    from studio.engine.export import lora_file_chunks as kohya_chunks

    if kohya_export_problem(run.bundle):
        return diffusers_lora_chunks(run.bundle)
    return kohya_chunks(run.bundle, run.job, steps=run.position.step, tag_frequency=run.report.tag_frequency(),
                        dtype=run.job.output.save_dtype)


def rescue(exc: BaseException, run: Run) -> Path | None:
    """Save a checkpoint of the last completed step after a failure, if the state is known to be whole.

    Not after a non-finite loss (those weights are suspect), not mid optimizer step (half-updated), not when
    the disk itself failed (it would fail again), and not under several processes (the others are not
    at a barrier to save with).
    """
    if run.optimizer is None or not run.is_main or run.accelerator.num_processes > 1:
        return None
    if isinstance(exc, failures.NonFiniteLoss) or not run.consistent or run.step == 0:
        return None
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return None
    if run.saved_step == run.step:
        return run.checkpoint
    try:
        run.optimizer.zero_grad(set_to_none=True)  # gradients are not saved: free them first (an OOM needs the room)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        folder, _ = write_checkpoint(run)
        log.info("saved the state after step %d to %s after the failure", run.step, folder)
        return folder
    except Exception as second:  # the failure report matters more than the rescue
        log.warning("could not save a checkpoint after the failure: %s", second)
        return None


def settle_failed_start(run: Run, resumed: bool) -> tuple[Path | None, Path | None]:
    """(run folder, log file) for the terminal event. A new run that ends before its first step and wrote nothing
    worth keeping removes its folder (so the next start gets the same name), keeping only its log, elsewhere."""
    run_dir = run.run_dir
    log_file = run_dir / "logs" / "run.log" if run_dir else None
    if run_dir is None or resumed or run.step or run.metrics is not None or run.log_handler is None:
        return run_dir, log_file
    handler, run.log_handler = run.log_handler, None
    detach_log_file(handler)
    _release_lock(run)
    from studio.paths import user_data_dir

    kept = RunFolder(run_dir).discard_unused(user_data_dir() / "logs")
    if kept is None and not run_dir.exists():
        return None, None
    return (None, kept) if kept else (run_dir, log_file)


def _release_lock(run: Run) -> None:
    lock, run.run_lock = run.run_lock, None
    if lock is not None:  # the run's files are closed: another process may take the run now
        lock.release()


def release(run: Run) -> None:
    """Free what the run held so the app can train again without restarting (GPU memory included)."""
    metrics, run.metrics = run.metrics, None
    if metrics:
        try:
            metrics.close()
        except OSError as exc:  # e.g. the disk filled up: the run already reported it
            log.warning("could not close metrics.jsonl: %s", exc)
    handler, run.log_handler = run.log_handler, None
    if handler:
        detach_log_file(handler)
    _release_lock(run)
    accelerator, run.accelerator = run.accelerator, None
    run.drop_models()
    if accelerator is not None:
        accelerator.free_memory()
        _reset_accelerate(accelerator)
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_accelerate(accelerator: Any) -> None:
    """Forget accelerate's process-wide state, so the next run in this process may pick another precision or device.

    The app trains several jobs in one process; accelerate keeps one AcceleratorState per process and refuses a
    second Accelerator with other settings. Under several processes the process group (PartialState) stays:
    those runs end with the process anyway.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=accelerator.num_processes == 1)
    GradientState._reset_state()
