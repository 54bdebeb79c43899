"""Everything before a run's first step: the preflight checks, then load, scan, cache, inject, plan."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from studio.engine import compiling, devices, failures, validation
from studio.engine.cache import TensorCache, model_fingerprint
from studio.engine.checkpoint import load_model
from studio.engine.config import Job, Problem, errors, validate
from studio.engine.events import LogMessage, StatusChanged, TrainEvent
from studio.engine.optim import make_optimizer
from studio.engine.recovery import restore
from studio.engine.run_data import cache_latents, cache_text, epoch_batches, make_resident
from studio.engine.run_state import Cancelled, Run
from studio.engine.runs import (
    RunFolder, attach_log_file, claim_run_dir, job_changes, lock_run, resume_problems, saved_job, writable_problems,
)
from studio.engine.state import resume_checkpoint

log = logging.getLogger(__name__)


def preflight(job: Job, resume_dir: Path | str | None = None) -> list[Problem]:
    """Every problem with the job, its paths and the run to resume, before anything heavy starts (warnings too)."""
    problems = validate(job, device_type=devices.pick_device(job.training.device).type
                        if not devices.device_problem(job.training.device) else None)
    if errors(problems):
        return problems
    if resume_dir is not None:
        problems += resume_problems(Path(resume_dir), job)
        if not errors(problems):
            problems += writable_problems(job, Path(resume_dir))
    else:
        problems += writable_problems(job)
    data = Path(job.dataset.path).expanduser()
    try:
        with os.scandir(data):
            pass
    except OSError as exc:
        problems.append(Problem("dataset.path", f"'{data}' cannot be read ({exc.strerror or exc}); check its permissions"))
    from studio.engine.export import kohya_export_problem

    refusal = kohya_export_problem(job.lora)
    if refusal:
        problems.append(Problem("lora.algorithm", refusal))
    problems += adapter_warnings(job)
    return problems


def adapter_warnings(job: Job) -> list[Problem]:
    """What the user should know before training an adapter some tools cannot apply as trained (never silent)."""
    from studio.engine.adapters import adapter_for
    from studio.engine.adapters.consumers import FULL, report

    adapter = adapter_for(job.lora)
    if adapter.name not in ("dora", "loha", "lokr"):
        return []
    info = {"layout": "kohya", "network_type": adapter.name, "family": job.model.family,
            "metadata": {"lora_studio.dora_target": job.lora.dora_target}}
    short = [f"{v.consumer} ({v.reason})" for v in report(info) if v.status != FULL]
    field = "lora.dora" if adapter.name == "dora" else "lora.algorithm"
    return [Problem(field, f"the {adapter.label} file will not load as trained in: " + "; ".join(short), "warning")]



def setup(run: Run, stop: threading.Event, resume_dir: Path | None) -> Iterator[TrainEvent]:
    """Everything before the first step, filling ``run``: accelerator, run folder, model, dataset, caches, LoRA,
    optimizer and schedule (and, when resuming, the saved state)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from studio.engine.dataset import plan_buckets, scan_dataset
    from studio.engine.lora import inject_lora

    t = run.job.training
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available())
    mixed = devices.resolve_precision(t.mixed_precision, cpu)
    job = run.job
    # A text encoder read at an inner layer (SDXL's penultimate states, clip skip) leaves its last layers' LoRA
    # without gradients; DDP must be told, or it waits for them and fails at the second step.
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=job.lora.train_text_encoder)
    accelerator = run.accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, kwargs_handlers=[ddp])

    # The main process claims the (never overwritten) run folder; the others learn its name.
    chosen = [str(resume_dir) if resume_dir else str(claim_run_dir(Path(job.output.dir))) if accelerator.is_main_process
              else ""]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    folder = run.folder = RunFolder(Path(chosen[0]))
    notes: list[str] = []
    damaged: list[str] = []
    if accelerator.is_main_process:
        run.run_lock = lock_run(folder.root)  # one process per run folder, until recovery.release
        if resume_dir:
            latest, damaged = resume_checkpoint(folder.checkpoints)  # verified; damaged newer ones set aside
            _, notes = job_changes(saved_job(folder.root), job)
            folder.forget_after(int(latest.name.split("-")[1]) if latest else 0, job.output.name)
        folder.create(job)  # on resume: the job that continues (only changes job_changes accepts)
        run.log_handler = attach_log_file(folder)
    log.info("run folder %s, %d process(es) on %s, precision %s", folder.root, accelerator.num_processes,
             accelerator.device, mixed)
    if notes:
        log.info("resuming with changes: %s", "; ".join(notes))
        yield LogMessage("info", "Changed since the run started: " + "; ".join(notes))
    for note in damaged:
        yield LogMessage("warning", note)

    run.phase = "loading"
    yield StatusChanged("Loading model", job.model.path)
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    # The denoiser stays in host memory until its LoRA is added and its frozen weights are stored as the job asks
    # (fp8): it reaches the device as stored, after the text encoders have cached the captions and left it.
    bundle = run.bundle = load_model(job.model, dtype=run.weight_dtype, device=accelerator.device, training=t)
    from studio.engine.families.sd import TEXT_OPTIONS

    # Caption length and clip skip, read by the family's text encoding (training, caching and previews).
    bundle.extra[TEXT_OPTIONS] = (t.max_token_length, t.clip_skip)
    # The VAE runs in fp32: SDXL's VAE overflows in fp16 and the VAE is used only for caching and previews.
    bundle.vae.to(accelerator.device, torch.float32)
    log.info("loaded %s (%s, %s) in %.1f s", bundle.source, bundle.family.label, bundle.prediction_type, bundle.load_time_s)
    yield LogMessage("info", f"Model: {bundle.family.label}, {bundle.prediction_type} prediction, loaded in {bundle.load_time_s:.1f} s")
    if job.lora.train_text_encoder and not bundle.family.trainable_text_encoders():
        # Said, and then the captions are cached and the encoder leaves the device as for any frozen encoder
        # (the run's own copy of the job: the caller's is not changed).
        job = run.job = dataclasses.replace(job, lora=dataclasses.replace(job.lora, train_text_encoder=False))
        yield LogMessage("warning", f"{bundle.family.label} trains no text-encoder LoRA (the tools that load its LoRAs "
                                    f"have no place for one): lora.train_text_encoder is ignored, the "
                                    f"{bundle.family.denoiser_name} is trained alone")

    run.phase = "scanning"
    yield StatusChanged("Scanning dataset", job.dataset.path)
    d = job.dataset
    report = scan_dataset(d.path, caption_extension=d.caption_extension, trigger_word=d.trigger_word,
                          repeats=d.repeats, default_repeats=d.default_repeats)
    for issue in report.issues:
        if issue.severity in ("error", "warning"):
            yield LogMessage("warning", f"{issue.file}: {issue.problem} ({issue.action})")
    if report.usable == 0:
        raise failures.NoUsableImages(d.path, report)
    report.items, held_out = validation.split_items(job, report.items)
    from studio.engine.sampling import preview_prompts

    run.prompts = preview_prompts(job.sampling, d.trigger_word, [item.caption for item in report.items])
    run.report, run.buckets = report, plan_buckets(report.items, d.resolution, d.bucket_step, d.buckets)

    frozen_te = not job.lora.train_text_encoder
    static_captions = frozen_te and not d.shuffle_tags
    run.model_fp = model_fingerprint(bundle.source, job.model.vae, bundle.family.name)
    run.latents = TensorCache("latents", to_disk=t.cache_to_disk and t.cache_latents)
    run.text = TensorCache("text", to_disk=t.cache_to_disk and t.cache_text_embeddings)
    run.text_is_static = static_captions and t.cache_text_embeddings and bundle.family.text_cacheable

    run.phase = "caching"
    if t.cache_latents:
        yield from cache_latents(run)
    if run.text_is_static:
        yield from cache_text(run)
    yield from _prepare_validation(run, held_out)
    if stop.is_set():
        raise Cancelled()

    run.phase = "setup"
    # peft draws LoRA A's initial values from the global RNG: seed it, so the same job gives the same LoRA
    # (and a run started in a busy process equals one started in a fresh one).
    torch.manual_seed(t.seed)
    run.params = inject_lora(bundle, job.lora, train_text_encoder=job.lora.train_text_encoder)
    apply_speed_options(run)  # ... and places the denoiser on the device
    make_resident(run)  # after the denoiser: the caches take a share of what is free once it is there
    run.optimizer = make_optimizer(run.params, job, accelerator.device)
    run.steps_per_epoch, run.total_steps = plan_steps(run)
    run.sample_every = preview_cadence(run)
    from diffusers.optimization import get_scheduler

    schedule = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
    run.scheduler = get_scheduler(schedule, run.optimizer, num_warmup_steps=t.warmup_steps,
                                  num_training_steps=run.total_steps)
    to_prepare = [bundle.denoiser] + ([*bundle.text_encoders] if job.lora.train_text_encoder else [])
    # Every model is on its device already; accelerate's own placement (model.to) would also move the frozen
    # weights of swapped blocks, which must stay on the host.
    prepared = accelerator.prepare(*to_prepare, run.optimizer, device_placement=[False] * len(to_prepare) + [True])
    run.optimizer = prepared[-1]
    run.denoiser_ddp = prepared[0]
    run.te_ddp = list(prepared[1:-1])

    if resume_dir is not None:
        restore(run)
        yield LogMessage("info", f"Resumed at step {run.position.step} of {run.total_steps} from {resume_dir}")


def _prepare_validation(run: Run, held_out: list) -> Iterator[TrainEvent]:
    """Encode the validation images with the base model's VAE (and frozen text encoders), main process only."""
    items, source = validation.validation_items(run, held_out)
    if not items or not run.is_main:
        return
    yield StatusChanged("Preparing validation images", source)
    run.validation = validation.prepare(run, items, source)
    yield LogMessage("info", f"Validation loss on {source}, every {run.job.validation.every} steps")


def apply_speed_options(run: Run) -> None:
    """The job's speed switches: TF32 for the run's device, then the family's (checkpointing, attention kernel,
    memory format, fp8 storage), the denoiser onto the device as the family places it (block swap), then compile."""
    t, bundle = run.job.training, run.bundle
    devices.set_tf32(run.device, t.tf32)
    bundle.family.apply_speed_options(bundle, t, run.job.lora.train_text_encoder)
    bundle.family.place_denoiser(bundle, t, run.device)
    # Last, so it compiles the model as the run will call it (checkpointing, attention kernel, fp8 storage).
    compiling.compile_denoiser(bundle.denoiser, bundle.family.compile_blocks(bundle.denoiser), t,
                               shapes=len(set(run.buckets)) or 1)


def preview_cadence(run: Run) -> int:
    """Steps between previews: the job's ``sampling.every``, or for 'auto' (-1) about every
    ``sampling.AUTO_PREVIEW_SECONDS`` of training, by the estimate's time per step for this job on this device."""
    from studio.engine.sampling import auto_preview_cadence

    every = run.job.sampling.every
    if every >= 0:
        return every
    per_step = None
    try:
        from studio.engine.estimate import estimate

        per_step = estimate(run.job, device=run.device.type).seconds_per_step
    except Exception as exc:  # the estimate is advice; a preview cadence must never stop a run
        log.warning("no estimate for the preview cadence (%s); previews every %d steps", exc, auto_preview_cadence(None))
    cadence = auto_preview_cadence(per_step)
    log.info("previews every %d steps (about every %.0f s at %s s/step)", cadence,
             cadence * (per_step or 0), f"{per_step:.3g}" if per_step else "?")
    return cadence


def plan_steps(run: Run) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of the job on this dataset."""
    t = run.job.training
    per_epoch = max(1, len(epoch_batches(run, 0)) // t.gradient_accumulation)
    total = t.epochs * per_epoch if t.epochs > 0 else t.steps
    return per_epoch, total
