"""run_training(job, stop) -> a stream of TrainEvents: setup (run_setup), the loop (here), recovery (recovery).

The loop's order, every step: lr → samples/checkpoint at their cadence → forward → loss → backward → clip →
optimizer step → zero_grad → StepCompleted → stop check. What differs between model families (noise,
target, conditioning, the denoiser's call) is the family's ``training_loss``; nothing here names a family.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch

from studio.engine import compiling, devices, failures, run_data, validation
from studio.engine.config import Job, errors
from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
    StepCompleted, TrainEvent, ValidationCompleted,
)
from studio.engine.families import Conditioning
from studio.engine.host_values import PendingValues
from studio.engine.recovery import (
    check_finite_weights, export_lora_file, failure_message, keep_unsaved, release, settle_failed_start,
    write_checkpoint,
)
from studio.engine.run_setup import preflight, setup
from studio.engine.run_state import Cancelled, Run
from studio.engine.runs import MetricsWriter, read_metrics
from studio.engine.state import rng_state, set_rng_state

__all__ = ["run_training", "preflight"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- entry point


def run_training(
    job: Job,
    stop: threading.Event | None = None,
    pause: threading.Event | None = None,
    *,
    resume_dir: Path | None = None,
) -> Iterator[TrainEvent]:
    """Train the job, yielding events; always ends with exactly one RunFinished, RunFailed or RunCancelled.

    ``stop`` and ``pause`` are checked at step boundaries. ``resume_dir`` continues an earlier run in place
    from its latest checkpoint; with the same job the final LoRA is the one an uninterrupted run would give.
    """
    stop = stop or threading.Event()
    pause = pause or threading.Event()
    run = Run(job)
    try:
        yield from _train(run, stop, pause, Path(resume_dir) if resume_dir else None)
    except Cancelled:
        run_dir, _ = settle_failed_start(run, resume_dir is not None)
        yield RunCancelled(run.step, run_dir, run.lora_path)
    except BaseException as exc:  # every failure becomes an event with a way out, never a silent exit
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        details = traceback.format_exc()
        unsaved = None
        try:
            unsaved = keep_unsaved(exc, run)  # before release(): the weights are still there
        except Exception as second:
            log.warning("could not keep the trained LoRA in memory: %r", second)
        try:
            message = failure_message(exc, run, unsaved)
        except Exception as second:  # explaining must never be what hides the failure
            log.warning("could not explain the failure: %r", second)
            message = f"Training failed ({type(exc).__name__}: {exc}). The log has the details."
        log.error("run failed: %s\n%s", message, details)
        run_dir, log_file = settle_failed_start(run, resume_dir is not None)
        yield RunFailed(message, details, run_dir, log_file, run.lora_path, unsaved)
    finally:
        release(run)


def _train(run: Run, stop: threading.Event, pause: threading.Event, resume_dir: Path | None) -> Iterator[TrainEvent]:
    job = run.job
    checked = preflight(job, resume_dir)
    problems = errors(checked)
    if problems:
        raise failures.ResumeRefused(resume_dir, problems) if resume_dir else failures.JobInvalid(problems)
    for warning in checked:  # e.g. an adapter type some tools cannot apply as trained: said before training
        if warning.severity == "warning" and warning.field.startswith("lora."):
            yield LogMessage("warning", str(warning))
    yield from setup(run, stop, resume_dir)
    unused = run.bundle.family.unused_training_options(job.training)
    if unused:
        yield LogMessage("warning", f"{', '.join(unused)}: no effect on {run.bundle.family.label}, which does not use "
                         "them (its LoRA's metadata records the values training used)")
    yield RunStarted(run.folder.root, run.total_steps, run.bundle.family.name, devices.describe_device(run.device),
                     run.report.usable, run.step, job)
    yield from _train_loop(run, stop, pause)
    run.phase = "exporting"
    check_finite_weights(run)
    lora_path = export_lora_file(run, final=True)
    run.accelerator.wait_for_everyone()
    run.lora_path = lora_path
    best = run.best_validation
    yield RunFinished(run.folder.root, lora_path, run.step, run.elapsed, *(best or (None, None)))


# ------------------------------------------------------------------------------------------------ the loop


def _train_loop(run: Run, stop: threading.Event, pause: threading.Event) -> Iterator[TrainEvent]:
    o = run.job.output
    metrics = run.metrics = MetricsWriter(run.folder, run.step) if run.is_main else None
    # Each step's loss on its way to the host, keyed (step, lr, time, extra metrics, skipped): read when the
    # device has it.
    pending = PendingValues()
    recent: deque[float] = deque(maxlen=20)
    data_cache: dict = {}
    # A resumed run's clock continues where the interrupted one stopped, so metrics.jsonl "time" stays monotonic.
    started, last_flush = time.perf_counter() - run.elapsed_before, time.perf_counter()
    run.elapsed, run.started = run.elapsed_before, started
    val_every = run.job.validation.every if run.validation is not None else 0
    if val_every:  # a resumed run knows the best step before the checkpoint from its own metrics
        run.best_validation = validation.best_from_metrics(read_metrics(run.folder.root))
        if run.step == 0:
            yield from _validate(run, metrics, 0)  # the base model's, to compare against
    every = run.sample_every  # the job's, or the one picked by time for 'auto' (run_setup.preview_cadence)
    if every and run.step == 0:
        yield from _sample(run)  # step-0 previews: the base model, to compare against
    yield StatusChanged("Training", f"{run.total_steps - run.step} steps to go")
    for module in [run.bundle.denoiser] + (run.bundle.text_encoders if run.job.lora.train_text_encoder else []):
        module.train()
    while run.step < run.total_steps:
        run.phase = "training"
        step_started = time.perf_counter()
        loss, skipped = _train_step(run, data_cache)
        run.position.step += 1
        run.consistent = True
        run.skipped_steps += skipped
        step = run.step
        recent.append(time.perf_counter() - step_started)
        extra: dict = {}
        pending.put((step, run.scheduler.get_last_lr()[0], time.perf_counter() - started, extra, skipped), loss)
        at_sample = bool(every) and step % every == 0
        at_save = bool(o.save_every) and step % o.save_every == 0 and step < run.total_steps
        at_validate = bool(val_every) and (step % val_every == 0 or step == run.total_steps)
        if at_validate:
            val_loss = extra["val_loss"] = validation.validation_loss(run)
        # Before a preview, a save, a pause or stop and the end every loss must be in; elsewhere the losses the
        # device has finished are reported a few times a second, without waiting for the others.
        must = at_sample or at_save or at_validate or stop.is_set() or pause.is_set() or step == run.total_steps
        if must or run.device.type == "cpu" or time.perf_counter() - last_flush > 0.5:
            yield from _flush(run, pending, recent, metrics, started, wait=must)
            last_flush = time.perf_counter()
        if at_validate:
            yield from _validate(run, None, step, val_loss)
        # Previews before the checkpoint: a checkpoint at step N then implies step N's previews exist, so a
        # run killed while sampling re-makes them on resume.
        if at_sample or (every and step == run.total_steps and step % every):
            yield from _sample(run)
        if at_save:
            yield from _save(run)
        if pause.is_set() and not stop.is_set():
            yield from _save(run)
            yield StatusChanged("Paused", f"at step {step}; the model stays loaded")
            while pause.is_set() and not stop.is_set():
                time.sleep(0.05)
            yield StatusChanged("Training", "resumed")
        if stop.is_set() and step < run.total_steps:
            yield from _save(run)
            raise Cancelled()
    run.elapsed = time.perf_counter() - started
    if metrics:
        metrics.close()
        run.metrics = None
    if run.skipped_steps:
        yield LogMessage("warning", f"{run.skipped_steps} of {run.total_steps} steps were skipped because fp16 "
                                    "gradients overflowed (the loss scale adapted; the learning-rate schedule did not "
                                    "advance on them). Many skips: try bf16 or a lower learning rate.")


def _train_step(run: Run, data_cache: dict) -> tuple[torch.Tensor, bool]:
    """Forward, backward and optimizer step over ``gradient_accumulation`` micro-batches; returns the loss (on
    device) and whether fp16 loss scaling skipped the optimizer step.

    If anything fails before the optimizer step, the data position goes back to where the step began, so
    the state is exactly that of the last completed step and can be saved and resumed from.
    """
    t, acc = run.job.training, run.accelerator
    start = (run.position.epoch, run.position.batch_index)
    params = [p for ps in run.params.values() for p in ps]
    scaler = getattr(acc, "scaler", None)
    try:
        # LoRA dropout draws from the global RNG: make it a function of the step.
        torch.manual_seed(run_data.step_seed(run, 0))
        total = torch.zeros((), device=run.device)
        for micro in range(t.gradient_accumulation):
            batch = run_data.next_batch(run, data_cache)
            latents, cond = run_data.batch_inputs(run, batch, micro)
            compiling.begin_step(t)
            last = micro == t.gradient_accumulation - 1
            with acc.no_sync(run.denoiser_ddp) if not last else nullcontext():
                loss = _loss(run, latents, cond, micro) / t.gradient_accumulation
                acc.backward(loss)
            total += loss.detach()
        norm = None
        if t.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(params, t.max_grad_norm)
        elif run.host_checks or _skips_on_device(run):  # the norm is only needed for the finite check then
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(total)
        if scaler is None and isinstance(norm, torch.Tensor):  # fp16 loss scaling skips inf gradients itself
            finite = finite & torch.isfinite(norm).to(finite.device)
        if run.host_checks and not bool(finite):
            what = "the loss" if not math.isfinite(float(total)) else "the gradients"
            raise failures.NonFiniteLoss(run.step + 1, run.job, run.lora_path, what=what, checkpoint=run.checkpoint,
                                         run_dir=run.run_dir, family=run.bundle.family)
    except BaseException:
        run.position.epoch, run.position.batch_index = start
        run.optimizer.zero_grad(set_to_none=True)
        raise
    run.consistent = False  # from here until the step is done, weights and optimizer state may be half-updated
    run.phase = "optimizer"
    skipped = apply_step(run, finite)
    run.phase = "training"
    return total, skipped


def apply_step(run: Run, finite: torch.Tensor) -> bool:
    """The optimizer step, then the learning-rate schedule unless fp16 loss scaling skipped the step (its
    gradients overflowed); returns whether it was skipped."""
    scaler = getattr(run.accelerator, "scaler", None)
    scale = getattr(scaler, "_scale", None)
    scale_before = scale.clone() if isinstance(scale, torch.Tensor) else None  # a device copy: no sync
    _optimizer_step(run, finite)
    skipped = _step_was_skipped(run, scaler, scale_before)
    if not skipped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return skipped


def _step_was_skipped(run: Run, scaler, scale_before: torch.Tensor | None) -> bool:
    """Whether GradScaler skipped the step. accelerate tells by whether the optimizer's step() was called, which
    holds for plain optimizers (GradScaler already read found_inf on the host for them); a fused one is always
    called, with found_inf on the device, so only the scale's back-off (halved on overflow, never otherwise
    lowered) tells: one read of a scalar, under fp16 with a fused optimizer only."""
    if scaler is None:
        return bool(run.accelerator.optimizer_step_was_skipped)
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    fused = getattr(inner, "_step_supports_amp_scaling", False)
    if not fused or scale_before is None:
        return bool(run.accelerator.optimizer_step_was_skipped)
    return bool(scaler._scale < scale_before)


def _loss(run: Run, latents: torch.Tensor, cond: Conditioning, micro: int) -> torch.Tensor:
    """The family's training loss for one micro-batch; its noise and timesteps come from the step's own seed."""
    gen = run_data.make_generator(run, run_data.step_seed(run, micro) ^ 0x5EED)
    return run.bundle.family.training_loss(run.bundle, run.denoiser_ddp, latents, cond, training=run.job.training,
                                           generator=gen, weight_dtype=run.weight_dtype)


def _optimizer_step(run: Run, finite: torch.Tensor) -> None:
    """Step the optimizer; where the check cannot run on the host, a non-finite step is skipped on the device.

    PyTorch's fused Adam/AdamW take a ``found_inf`` tensor (the mechanism GradScaler uses) and leave weights,
    moments and step counts untouched when it is 1, without a host sync. The NaN is then reported at the next
    flush of the losses, and the weights in memory are still the last finite ones. Other optimizers step as
    usual; every save checks the weights first, so no saved LoRA is ever non-finite.
    """
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    on_device = _skips_on_device(run)
    if on_device:
        inner.found_inf = (~finite).to(torch.float32)
    try:
        run.optimizer.step()
    finally:
        if on_device:
            del inner.found_inf


def _skips_on_device(run: Run) -> bool:
    # Not under fp16 loss scaling: GradScaler sets found_inf on fused optimizers itself.
    inner = getattr(run.optimizer, "optimizer", run.optimizer)
    return (not run.host_checks and getattr(run.accelerator, "scaler", None) is None
            and bool(getattr(inner, "defaults", {}).get("fused")))


# ----------------------------------------------------------------------------------- what the loop emits


def _flush(run: Run, pending: PendingValues, recent: deque, metrics: MetricsWriter | None, started: float, *,
           wait: bool) -> Iterator[TrainEvent]:
    done = pending.take(wait=wait)
    if not done:
        return
    for (step, lr, when, extra, skipped), loss in done:
        if not math.isfinite(loss):
            raise failures.NonFiniteLoss(step, run.job, run.lora_path, checkpoint=run.checkpoint,
                                         run_dir=run.run_dir, family=run.bundle.family)
        rate = len(recent) / max(sum(recent), 1e-9)
        eta = (run.total_steps - step) / rate
        if metrics:
            metrics.write(step, loss, lr, when, **extra)
        yield StepCompleted(step, run.total_steps, loss, lr, time.perf_counter() - started, rate, eta,
                            run.position.epoch, skipped)
    if metrics:
        metrics.flush()


def _validate(run: Run, metrics: MetricsWriter | None, step: int, loss: float | None = None) -> Iterator[TrainEvent]:
    """The validation event of ``step``, whose loss was written with the step's metrics; without ``loss``, the base
    model's before the first step (measured and written here)."""
    if loss is None:
        loss = validation.validation_loss(run)
        if metrics:
            metrics.write_validation(step, loss, 0.0)
    run.best_validation = validation.best([*([run.best_validation] if run.best_validation else []), (step, loss)])
    best_step, best_loss = run.best_validation or (step, loss)
    yield ValidationCompleted(step, loss, best_step, best_loss, run.validation.count)


def _sample(run: Run) -> Iterator[TrainEvent]:
    from studio.engine.sampling import preview_embeds_cached, render_many, sample_file_name, save_png

    if not run.is_main:
        return
    run.phase = "sampling"
    # Previews must not move any RNG the training reads, or a run with previews (or a resumed run, which
    # skips the step-0 ones) would train differently from one without.
    saved_rng = rng_state()
    s, d = run.job.sampling, run.job.dataset
    te_offloaded = run.bundle.extra.pop("text_encoders_offloaded", False)
    # Prompts encoded at set-up (run_data.cache_text) need no text encoder back beside the model.
    bring_back = te_offloaded and not preview_embeds_cached(run.bundle, run.prompts, s.negative_prompt)
    try:
        if bring_back:
            for te in run.bundle.text_encoders:
                te.to(run.device)
        step = run.step
        yield StatusChanged("Sampling", f"{len(run.prompts)} preview image(s) at step {step}")
        images = render_many(run.bundle, run.prompts, seeds=[s.seed + i for i in range(len(run.prompts))],
                             negative_prompt=s.negative_prompt, steps=s.steps, guidance=s.guidance,
                             width=s.width or d.resolution, height=s.height or d.resolution,
                             autocast_dtype=run.weight_dtype)
        for index, (prompt, image) in enumerate(zip(run.prompts, images)):
            path = run.folder.samples / sample_file_name(step, index)
            save_png(image, path, {"prompt": prompt, "negative_prompt": s.negative_prompt, "step": str(step),
                                   "seed": str(s.seed + index), "sampler": run.bundle.family.preview.sampler,
                                   "steps": str(s.steps), "guidance": str(s.guidance), "model": run.job.model.path})
            yield SampleReady(step, index, prompt, s.seed + index, path, image)
    finally:
        if bring_back:
            for te in run.bundle.text_encoders:
                te.to("cpu")
        if te_offloaded:
            run.bundle.extra["text_encoders_offloaded"] = True
        set_rng_state(saved_rng)
    yield StatusChanged("Training", f"step {step} / {run.total_steps}")
    run.phase = "training"


def _save(run: Run) -> Iterator[TrainEvent]:
    """A resumable checkpoint plus an intermediate LoRA named by step (main process writes, all wait)."""
    if run.saved_step == run.step:  # e.g. stop right after a cadence save: nothing new to save
        return
    run.accelerator.wait_for_everyone()
    folder = lora_path = None
    if run.is_main:
        folder, lora_path = write_checkpoint(run)
    run.accelerator.wait_for_everyone()
    run.saved_step = run.step
    yield CheckpointSaved(run.step, folder or run.folder.checkpoints, lora_path)
