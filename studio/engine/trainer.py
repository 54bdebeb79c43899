"""run_training(job, stop) -> a stream of TrainEvents: load, scan, cache, inject LoRA, train, sample, save, export."""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import threading
import time
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from studio.engine import devices, failures
from studio.engine.cache import TensorCache, cache_key, model_fingerprint
from studio.engine.checkpoint import ModelBundle, load_model
from studio.engine.config import Job, Problem, errors, validate
from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
    StepCompleted, TrainEvent,
)
from studio.engine.optim import make_optimizer
from studio.engine.families import Conditioning, encode_prompts, sdxl_time_ids, unet_added_cond
from studio.engine.runs import (
    MetricsWriter, RunFolder, attach_log_file, claim_run_dir, detach_log_file, job_changes, lock_run, resume_problems,
    saved_job, writable_problems,
)
from studio.engine.state import (
    TrainPosition, all_finite, latest_checkpoint, load_checkpoint, resume_checkpoint, rng_state, save_checkpoint,
    set_rng_state,
)

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside the loop when the stop event is set; turns into RunCancelled."""


@dataclass
class Example:
    """One training example as the loop sees it: a cached (or freshly encoded) latent and its caption."""

    item_index: int
    bucket: tuple[int, int]  # (width, height)


@dataclass
class Run:
    """Everything the loop needs, built once by the setup functions below."""

    job: Job
    folder: RunFolder
    accelerator: Any
    bundle: ModelBundle
    report: Any  # studio.engine.dataset.DatasetReport
    buckets: list[tuple[int, int]]
    weight_dtype: torch.dtype
    latents: TensorCache
    text: TensorCache
    text_is_static: bool
    model_fp: str
    params: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    steps_per_epoch: int = 1
    total_steps: int = 1
    position: TrainPosition = field(default_factory=TrainPosition)
    prompts: list[str] = field(default_factory=list)
    unet_ddp: Any = None  # the UNet as accelerate prepared it (DDP-wrapped under several processes)
    te_ddp: list = field(default_factory=list)
    elapsed_before: float = 0.0  # training seconds of the interrupted run, when resuming

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def host_checks(self) -> bool:
        return _checks_on_host(self.device)


def _checks_on_host(device: torch.device) -> bool:
    # Reading a value on the CPU costs nothing, so non-finite losses are caught before the optimizer step
    # there; on an accelerator that read would stall the queue every step (see _optimizer_step).
    return device.type == "cpu"


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
    ctx: dict[str, Any] = {"phase": "setup", "consistent": True}
    try:
        yield from _train(job, stop, pause, Path(resume_dir) if resume_dir else None, ctx)
    except Cancelled:
        run_dir, _ = _settle_failed_start(ctx, resume_dir is not None)
        yield RunCancelled(ctx.get("step", 0), run_dir, ctx.get("lora_path"))
    except BaseException as exc:  # every failure becomes an event with a way out, never a silent exit
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        details = traceback.format_exc()
        try:
            message = _failure_message(exc, job, ctx)
        except Exception as second:  # explaining must never be what hides the failure
            log.warning("could not explain the failure: %r", second)
            message = f"Training failed ({type(exc).__name__}: {exc}). The log has the details."
        log.error("run failed: %s\n%s", message, details)
        run_dir, log_file = _settle_failed_start(ctx, resume_dir is not None)
        yield RunFailed(message, details, run_dir, log_file, ctx.get("lora_path"))
    finally:
        _release(ctx)


def preflight(job: Job, resume_dir: Path | str | None = None) -> list[Problem]:
    """Every problem with the job, its paths and the run to resume, before anything heavy starts (warnings too)."""
    problems = validate(job)
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

    dora = kohya_export_problem(job.lora)
    if dora and not job.output.save_diffusers:
        problems.append(Problem("lora.dora", dora + " (set output.save_diffusers = true to train it anyway)"))
    return problems


def _train(job: Job, stop: threading.Event, pause: threading.Event, resume_dir: Path | None, ctx: dict) -> Iterator[TrainEvent]:
    problems = errors(preflight(job, resume_dir))
    if problems:
        raise failures.ResumeRefused(resume_dir, problems) if resume_dir else failures.JobInvalid(problems)
    run = yield from _setup(job, stop, resume_dir, ctx)
    yield RunStarted(run.folder.root, run.total_steps, run.bundle.family.name, devices.describe_device(run.device),
                     run.report.usable, run.position.step, job)
    yield from _train_loop(run, stop, pause, ctx)
    ctx["phase"] = "exporting"
    _check_finite_weights(run, ctx)
    lora_path = _export(run, final=True)
    run.accelerator.wait_for_everyone()
    ctx["lora_path"] = lora_path
    yield RunFinished(run.folder.root, lora_path, run.position.step, ctx["elapsed"])


# -------------------------------------------------------------------------------------------------- setup


def _setup(job: Job, stop: threading.Event, resume_dir: Path | None, ctx: dict) -> Iterator[TrainEvent]:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from studio.engine.dataset import plan_buckets, scan_dataset
    from studio.engine.lora import inject_lora

    t = job.training
    cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available())
    mixed = devices.resolve_precision(t.mixed_precision, cpu)
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu)
    ctx["accelerator"] = accelerator

    # The main process claims the (never overwritten) run folder; the others learn its name.
    chosen = [str(resume_dir) if resume_dir else str(claim_run_dir(Path(job.output.dir))) if accelerator.is_main_process
              else ""]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    folder = RunFolder(Path(chosen[0]))
    ctx["run_dir"] = folder.root
    notes: list[str] = []
    damaged: list[str] = []
    if accelerator.is_main_process:
        ctx["run_lock"] = lock_run(folder.root)  # one process per run folder, until _release
        if resume_dir:
            latest, damaged = resume_checkpoint(folder.checkpoints)  # verified; damaged newer ones set aside
            _, notes = job_changes(saved_job(folder.root), job)
            folder.forget_after(int(latest.name.split("-")[1]) if latest else 0, job.output.name)
        folder.create(job)  # on resume: the job that continues (only changes job_changes accepts)
        ctx["log_handler"] = attach_log_file(folder)
    log.info("run folder %s, %d process(es) on %s, precision %s", folder.root, accelerator.num_processes,
             accelerator.device, mixed)
    if notes:
        log.info("resuming with changes: %s", "; ".join(notes))
        yield LogMessage("info", "Changed since the run started: " + "; ".join(notes))
    for note in damaged:
        yield LogMessage("warning", note)

    ctx["phase"] = "loading"
    yield StatusChanged("Loading model", job.model.path)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    bundle = load_model(job.model, dtype=weight_dtype, device=accelerator.device)
    ctx["bundle"] = bundle
    # The VAE runs in fp32: SDXL's VAE overflows in fp16 and the VAE is used only for caching and previews.
    bundle.vae.to(accelerator.device, torch.float32)
    log.info("loaded %s (%s, %s) in %.1f s", bundle.source, bundle.family.label, bundle.prediction_type, bundle.load_time_s)
    yield LogMessage("info", f"Model: {bundle.family.label}, {bundle.prediction_type} prediction, loaded in {bundle.load_time_s:.1f} s")

    ctx["phase"] = "scanning"
    yield StatusChanged("Scanning dataset", job.dataset.path)
    d = job.dataset
    report = scan_dataset(d.path, caption_extension=d.caption_extension, trigger_word=d.trigger_word,
                          repeats=d.repeats, default_repeats=d.default_repeats)
    for issue in report.issues:
        if issue.severity in ("error", "warning"):
            yield LogMessage("warning", f"{issue.file}: {issue.problem} ({issue.action})")
    if report.usable == 0:
        raise failures.NoUsableImages(d.path, report)
    buckets = plan_buckets(report.items, d.resolution, d.bucket_step, d.buckets)

    frozen_te = not job.lora.train_text_encoder
    static_captions = frozen_te and not d.shuffle_tags
    fp = model_fingerprint(bundle.source, job.model.vae, bundle.family.name)
    run = Run(
        job, folder, accelerator, bundle, report, buckets, weight_dtype,
        latents=TensorCache("latents", to_disk=t.cache_to_disk and t.cache_latents),
        text=TensorCache("text", to_disk=t.cache_to_disk and t.cache_text_embeddings),
        text_is_static=static_captions and t.cache_text_embeddings, model_fp=fp,
    )
    ctx["run"] = run

    ctx["phase"] = "caching"
    if t.cache_latents:
        yield from _cache_latents(run)
    if run.text_is_static:
        yield from _cache_text(run)
    if stop.is_set():
        raise Cancelled()

    ctx["phase"] = "setup"
    # peft draws LoRA A's initial values from the global RNG: seed it, so the same job gives the same LoRA
    # (and a run started in a busy process equals one started in a fresh one).
    torch.manual_seed(t.seed)
    run.params = inject_lora(bundle, job.lora, train_text_encoder=job.lora.train_text_encoder)
    _apply_speed_options(run)
    run.optimizer = make_optimizer(run.params, job, accelerator.device)
    run.steps_per_epoch, run.total_steps = _plan_steps(run)
    from diffusers.optimization import get_scheduler

    schedule = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
    run.scheduler = get_scheduler(schedule, run.optimizer, num_warmup_steps=t.warmup_steps,
                                  num_training_steps=run.total_steps)
    to_prepare = [bundle.unet] + ([*bundle.text_encoders] if job.lora.train_text_encoder else [])
    prepared = accelerator.prepare(*to_prepare, run.optimizer)
    run.optimizer = prepared[-1]
    run.unet_ddp = prepared[0]
    run.te_ddp = list(prepared[1:-1])

    if resume_dir is not None:
        _restore(run, ctx)
        yield LogMessage("info", f"Resumed at step {run.position.step} of {run.total_steps} from {resume_dir}")
    from studio.engine.sampling import preview_prompts

    run.prompts = preview_prompts(job.sampling, d.trigger_word, [item.caption for item in report.items])
    return run


def _apply_speed_options(run: Run) -> None:
    t, unet = run.job.training, run.bundle.unet
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if run.job.lora.train_text_encoder:
            for te in run.bundle.text_encoders:
                te.gradient_checkpointing_enable()
    if t.attention == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    if t.compile:
        # Compile the repeated transformer blocks, not the whole UNet: each block compiles once and is reused.
        for name, module in unet.named_modules():
            if type(module).__name__ == "BasicTransformerBlock":
                module.compile()


def _plan_steps(run: Run) -> tuple[int, int]:
    t = run.job.training
    per_epoch = max(1, len(_epoch_batches(run, 0)) // t.gradient_accumulation)
    total = t.epochs * per_epoch if t.epochs > 0 else t.steps
    return per_epoch, total


def _restore(run: Run, ctx: dict) -> None:
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
    ctx.update(step=position.step, saved_step=position.step, checkpoint=folder)
    previous = run.folder.lora_path(run.job.output.name, position.step)
    if previous.is_file():
        ctx["lora_path"] = previous


# ------------------------------------------------------------------------------------------------ caching


def _latent_key(run: Run, index: int, flip: bool) -> str:
    item = run.report.items[index]
    return cache_key("latent-v1", item.sha256, run.buckets[index], flip, run.model_fp)


def _encode_latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    """VAE-encode one image at its bucket size; keep mean and std so each step can draw a fresh sample."""
    from studio.engine.dataset import load_image, prepare_image

    item = run.report.items[index]
    pixels, crop_tl, original_hw = prepare_image(load_image(item.image_path), run.buckets[index], flip=flip)
    vae = run.bundle.vae
    with torch.no_grad():
        dist = vae.encode(pixels.unsqueeze(0).to(run.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return {
        "mean": (dist.mean[0] * scale).float(), "std": (dist.std[0] * scale).float(),
        "crop_tl": torch.tensor(crop_tl), "original_hw": torch.tensor(original_hw),
    }


def _checked_latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    # Caching moves every latent to the host anyway, so checking it here costs no extra sync; a NaN latent
    # would otherwise surface many steps later as a NaN loss with no hint that the VAE caused it.
    value = _encode_latent(run, index, flip)
    if not (torch.isfinite(value["mean"]).all() and torch.isfinite(value["std"]).all()):
        item = run.report.items[index]
        raise failures.NonFiniteLatent(_rel(item.image_path, run.report.root), run.bundle.family.name)
    return value


def _latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    key = _latent_key(run, index, flip)
    if run.job.training.cache_latents:
        return run.latents.get_or_compute(key, lambda: _checked_latent(run, index, flip))
    return _encode_latent(run, index, flip)


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _cache_latents(run: Run) -> Iterator[TrainEvent]:
    from studio.engine.dataset import DatasetImageError

    flips = (False, True) if run.job.dataset.random_flip else (False,)
    todo = [(i, f) for i in range(len(run.report.items)) for f in flips]
    bad: set[int] = set()
    # With a disk cache the main process encodes first; the others then read what it wrote.
    for turn in ("main", "others"):
        if (turn == "main") == run.is_main:
            started = time.perf_counter()
            for n, (index, flip) in enumerate(todo):
                if index in bad:
                    continue
                try:
                    _latent(run, index, flip)
                except (DatasetImageError, OSError) as exc:
                    # The scan read it fine, so it changed since (deleted, replaced, on a lost network share):
                    # skip it like the scan skips bad files, rather than losing the whole run.
                    bad.add(index)
                    rel = _rel(run.report.items[index].image_path, run.report.root)
                    why = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or exc
                    yield LogMessage("warning", f"{rel}: could not be read any more ({why}); skipped")
                if n % 8 == 0 or n == len(todo) - 1:
                    yield StatusChanged("Caching latents", f"{n + 1} / {len(todo)} images", (n + 1) / len(todo))
            log.info("latent cache: %d entries (%d reused) in %.1f s", len(todo), run.latents.hits,
                     time.perf_counter() - started)
        run.accelerator.wait_for_everyone()
    if bad:
        keep = [i for i in range(len(run.report.items)) if i not in bad]
        run.report.items = [run.report.items[i] for i in keep]
        run.buckets = [run.buckets[i] for i in keep]
        if not run.report.items:
            raise failures.NoUsableImages(run.job.dataset.path, run.report)


def _text_key(run: Run, caption: str) -> str:
    return cache_key("text-v1", caption, run.model_fp)


def _encode_text(run: Run, captions: list[str]) -> Conditioning:
    b = run.bundle
    return encode_prompts(b.family, b.tokenizers, b.text_encoders, captions)


def _cached_text(run: Run, caption: str) -> Conditioning:
    def compute() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond = _encode_text(run, [caption])
        out = {"hidden": cond.hidden_states[0].float()}
        if cond.pooled is not None:
            out["pooled"] = cond.pooled[0].float()
        return out

    value = run.text.get_or_compute(_text_key(run, caption), compute)
    pooled = value["pooled"].unsqueeze(0) if "pooled" in value else None
    return Conditioning(value["hidden"].unsqueeze(0), pooled)


def _cache_text(run: Run) -> Iterator[TrainEvent]:
    captions = sorted({_caption(run, i, random.Random(0), dropout=False) for i in range(len(run.report.items))})
    if run.job.dataset.caption_dropout > 0:
        captions.append("")
    for n, caption in enumerate(captions):
        _cached_text(run, caption)
        if n % 16 == 0 or n == len(captions) - 1:
            yield StatusChanged("Caching text embeddings", f"{n + 1} / {len(captions)} captions", (n + 1) / len(captions))
    # Nothing else needs the frozen text encoders on the accelerator until previews, which move them back.
    if run.device.type != "cpu":
        for te in run.bundle.text_encoders:
            te.to("cpu")
        run.bundle.extra["text_encoders_offloaded"] = True


# ------------------------------------------------------------------------------------------- data order


def _epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    """This process's batches for ``epoch``: a seeded shuffle of repeated items, grouped by bucket.

    A pure function of (seed, epoch), so a resumed run sees exactly the batches the killed one would have.
    """
    t = run.job.training
    rng = random.Random(t.seed * 1_000_003 + epoch)
    order = [i for i, item in enumerate(run.report.items) for _ in range(item.repeats)]
    rng.shuffle(order)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in order:
        by_bucket.setdefault(run.buckets[i], []).append(i)
    batches = [idx[k:k + t.batch_size] for idx in by_bucket.values() for k in range(0, len(idx), t.batch_size)]
    rng.shuffle(batches)
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    if world > 1:
        while len(batches) < world:  # fewer batches than processes: reuse some so every process has work
            batches += batches[: world - len(batches)]
        batches = batches[: len(batches) // world * world][rank::world]
    return batches


def _next_batch(run: Run, cache: dict) -> list[int]:
    p = run.position
    while True:
        if cache.get("epoch") != p.epoch:
            cache["epoch"], cache["batches"] = p.epoch, _epoch_batches(run, p.epoch)
        if p.batch_index < len(cache["batches"]):
            batch = cache["batches"][p.batch_index]
            p.batch_index += 1
            return batch
        p.epoch, p.batch_index = p.epoch + 1, 0


# ------------------------------------------------------------------------------------------------- a step


def _step_seed(run: Run, micro: int) -> int:
    return (run.job.training.seed * 7919 + run.position.step * 104_729 + micro * 31 + run.accelerator.process_index) % (2**63)


def _caption(run: Run, index: int, rng: random.Random, *, dropout: bool = True) -> str:
    from studio.engine.dataset import compose_caption

    d = run.job.dataset
    return compose_caption(run.report.items[index].caption, trigger_word=d.trigger_word, shuffle_tags=d.shuffle_tags,
                           keep_tokens=d.keep_tokens, dropout=d.caption_dropout if dropout else 0.0, rng=rng)


def _batch_inputs(run: Run, batch: list[int], micro: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor | None]:
    """Latents (freshly sampled from the cached distribution), text conditioning and SDXL time ids."""
    seed = _step_seed(run, micro)
    rng = random.Random(seed)
    gen = torch.Generator("cpu").manual_seed(seed)
    flips = [run.job.dataset.random_flip and rng.random() < 0.5 for _ in batch]
    entries = [_latent(run, i, f) for i, f in zip(batch, flips)]
    mean = torch.stack([e["mean"] for e in entries])
    std = torch.stack([e["std"] for e in entries])
    latents = (mean + std * torch.randn(mean.shape, generator=gen)).to(run.device, non_blocking=True)
    captions = [_caption(run, i, rng) for i in batch]
    if run.text_is_static:
        cond = Conditioning.cat([_cached_text(run, c) for c in captions])
    else:
        with torch.no_grad() if not run.job.lora.train_text_encoder else nullcontext():
            cond = _encode_text(run, captions)
    cond = cond.to(run.device, run.weight_dtype)
    time_ids = None
    if run.bundle.family.is_sdxl:
        h, w = run.buckets[batch[0]][1], run.buckets[batch[0]][0]
        time_ids = torch.stack([sdxl_time_ids(tuple(e["original_hw"].tolist()), tuple(e["crop_tl"].tolist()), (h, w))
                                for e in entries]).to(run.device)
    return latents, cond, time_ids


def _loss(run: Run, latents: torch.Tensor, cond: Conditioning, time_ids: torch.Tensor | None, micro: int) -> torch.Tensor:
    """The denoising loss of diffusers' train_text_to_image_lora.py, with noise offset and min-SNR weighting."""
    from diffusers.training_utils import compute_snr

    t, sched = run.job.training, run.bundle.noise_scheduler
    gen = torch.Generator("cpu").manual_seed(_step_seed(run, micro) ^ 0x5EED)
    noise = torch.randn(latents.shape, generator=gen)
    if t.noise_offset:
        noise += t.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noise, timesteps = noise.to(run.device), timesteps.to(run.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = sched.get_velocity(latents, noise, timesteps) if run.bundle.prediction_type == "v_prediction" else noise
    pred = run.unet_ddp(noisy.to(run.weight_dtype), timesteps, cond.hidden_states,
                        added_cond_kwargs=unet_added_cond(run.bundle.family, cond, time_ids)).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if t.min_snr_gamma > 0:
        # Min-SNR weighting (Hang et al. 2023): clamp the per-timestep weight at gamma / SNR.
        snr = compute_snr(sched, timesteps)
        weight = torch.clamp(snr, max=t.min_snr_gamma) / (snr + 1 if run.bundle.prediction_type == "v_prediction" else snr)
        loss = loss * weight
    return loss.mean()


def _train_step(run: Run, data_cache: dict, ctx: dict) -> torch.Tensor:
    """Forward, backward and optimizer step over ``gradient_accumulation`` micro-batches; returns the loss (on device).

    If anything fails before the optimizer step, the data position goes back to where the step began, so
    the state is exactly that of the last completed step and can be saved and resumed from.
    """
    t, acc = run.job.training, run.accelerator
    start = (run.position.epoch, run.position.batch_index)
    params = [p for ps in run.params.values() for p in ps]
    scaler = getattr(acc, "scaler", None)
    try:
        torch.manual_seed(_step_seed(run, 0))  # LoRA dropout draws from the global RNG: make it a function of the step
        total = torch.zeros((), device=run.device)
        for micro in range(t.gradient_accumulation):
            batch = _next_batch(run, data_cache)
            latents, cond, time_ids = _batch_inputs(run, batch, micro)
            last = micro == t.gradient_accumulation - 1
            with acc.no_sync(run.unet_ddp) if not last else nullcontext():
                loss = _loss(run, latents, cond, time_ids, micro) / t.gradient_accumulation
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
            step = run.position.step + 1
            what = "the loss" if not math.isfinite(float(total)) else "the gradients"
            raise failures.NonFiniteLoss(step, run.job, ctx.get("lora_path"), what=what,
                                         checkpoint=ctx.get("checkpoint"), run_dir=run.folder.root,
                                         family=run.bundle.family.name)
    except BaseException:
        run.position.epoch, run.position.batch_index = start
        run.optimizer.zero_grad(set_to_none=True)
        raise
    ctx["consistent"] = False  # from here until the step is done, weights and optimizer state may be half-updated
    ctx["phase"] = "optimizer"
    _optimizer_step(run, finite)
    if not acc.optimizer_step_was_skipped:  # fp16 overflow skips the step; the schedule must not move then
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    ctx["phase"] = "training"
    return total


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


# ------------------------------------------------------------------------------------------------ the loop


def _train_loop(run: Run, stop: threading.Event, pause: threading.Event, ctx: dict) -> Iterator[TrainEvent]:
    t, s, o = run.job.training, run.job.sampling, run.job.output
    metrics = MetricsWriter(run.folder, run.position.step) if run.is_main else None
    ctx["metrics"] = metrics
    pending: list[tuple[int, torch.Tensor, float, float]] = []  # (step, loss on device, lr, time): synced in batches
    recent: deque[float] = deque(maxlen=20)
    data_cache: dict = {}
    # A resumed run's clock continues where the interrupted one stopped, so metrics.jsonl "time" stays monotonic.
    started, last_flush = time.perf_counter() - run.elapsed_before, time.perf_counter()
    ctx["elapsed"] = run.elapsed_before
    ctx["started"] = started
    if s.every and run.position.step == 0:
        yield from _sample(run, ctx)  # step-0 previews: the base model, to compare against
    yield StatusChanged("Training", f"{run.total_steps - run.position.step} steps to go")
    for module in [run.bundle.unet] + (run.bundle.text_encoders if run.job.lora.train_text_encoder else []):
        module.train()
    while run.position.step < run.total_steps:
        ctx["phase"] = "training"
        step_started = time.perf_counter()
        loss = _train_step(run, data_cache, ctx)
        run.position.step += 1
        ctx["step"] = step = run.position.step
        ctx["consistent"] = True
        recent.append(time.perf_counter() - step_started)
        pending.append((step, loss, run.scheduler.get_last_lr()[0], time.perf_counter() - started))
        at_sample = bool(s.every) and step % s.every == 0
        at_save = bool(o.save_every) and step % o.save_every == 0 and step < run.total_steps
        # Reading the loss forces a device sync: do it on the CPU every step, elsewhere a few times a second.
        if run.device.type == "cpu" or at_sample or at_save or stop.is_set() or pause.is_set() \
                or step == run.total_steps or time.perf_counter() - last_flush > 0.5:
            yield from _flush(run, pending, recent, metrics, started, ctx)
            last_flush = time.perf_counter()
        # Previews before the checkpoint: a checkpoint at step N then implies step N's previews exist, so a
        # run killed while sampling re-makes them on resume.
        if at_sample or (s.every and step == run.total_steps and step % s.every):
            yield from _sample(run, ctx)
        if at_save:
            yield from _save(run, ctx)
        if pause.is_set() and not stop.is_set():
            yield from _save(run, ctx)
            yield StatusChanged("Paused", f"at step {step}; the model stays loaded")
            while pause.is_set() and not stop.is_set():
                time.sleep(0.05)
            yield StatusChanged("Training", "resumed")
        if stop.is_set() and step < run.total_steps:
            yield from _save(run, ctx)
            raise Cancelled()
    ctx["elapsed"] = time.perf_counter() - started
    if metrics:
        metrics.close()
        ctx["metrics"] = None


def _flush(run: Run, pending: list, recent: deque, metrics: MetricsWriter | None, started: float, ctx: dict) -> Iterator[TrainEvent]:
    if not pending:
        return
    losses = torch.stack([p[1] for p in pending]).float().cpu().tolist()  # one sync for the whole batch of steps
    for (step, _, lr, when), loss in zip(pending, losses):
        if not math.isfinite(loss):
            raise failures.NonFiniteLoss(step, run.job, ctx.get("lora_path"), checkpoint=ctx.get("checkpoint"),
                                         run_dir=run.folder.root, family=run.bundle.family.name)
        rate = len(recent) / max(sum(recent), 1e-9)
        eta = (run.total_steps - step) / rate
        if metrics:
            metrics.write(step, loss, lr, when)
        yield StepCompleted(step, run.total_steps, loss, lr, time.perf_counter() - started, rate, eta,
                            run.position.epoch)
    if metrics:
        metrics.flush()
    pending.clear()


def _sample(run: Run, ctx: dict) -> Iterator[TrainEvent]:
    from studio.engine.sampling import render, sample_file_name, save_png

    if not run.is_main:
        return
    ctx["phase"] = "sampling"
    # Previews must not move any RNG the training reads, or a run with previews (or a resumed run, which
    # skips the step-0 ones) would train differently from one without.
    saved_rng = rng_state()
    s, d = run.job.sampling, run.job.dataset
    te_offloaded = run.bundle.extra.pop("text_encoders_offloaded", False)
    try:
        if te_offloaded:
            for te in run.bundle.text_encoders:
                te.to(run.device)
        step = run.position.step
        yield StatusChanged("Sampling", f"{len(run.prompts)} preview image(s) at step {step}")
        for index, prompt in enumerate(run.prompts):
            image = render(run.bundle, prompt, negative_prompt=s.negative_prompt, seed=s.seed + index, steps=s.steps,
                           guidance=s.guidance, width=s.width or d.resolution, height=s.height or d.resolution,
                           autocast_dtype=run.weight_dtype)
            path = run.folder.samples / sample_file_name(step, index)
            save_png(image, path, {"prompt": prompt, "negative_prompt": s.negative_prompt, "step": str(step),
                                   "seed": str(s.seed + index), "sampler": "euler", "steps": str(s.steps),
                                   "guidance": str(s.guidance), "model": run.job.model.path})
            yield SampleReady(step, index, prompt, s.seed + index, path, image)
    finally:
        if te_offloaded:
            for te in run.bundle.text_encoders:
                te.to("cpu")
            run.bundle.extra["text_encoders_offloaded"] = True
        set_rng_state(saved_rng)
    yield StatusChanged("Training", f"step {step} / {run.total_steps}")
    ctx["phase"] = "training"


def _save(run: Run, ctx: dict) -> Iterator[TrainEvent]:
    """A resumable checkpoint plus an intermediate LoRA named by step (main process writes, all wait)."""
    if ctx.get("saved_step") == run.position.step:  # e.g. stop right after a cadence save: nothing new to save
        return
    run.accelerator.wait_for_everyone()
    folder = lora_path = None
    if run.is_main:
        folder, lora_path = _write_checkpoint(run, ctx)
    run.accelerator.wait_for_everyone()
    ctx["saved_step"] = run.position.step
    yield CheckpointSaved(run.position.step, folder or run.folder.checkpoints, lora_path)


def _write_checkpoint(run: Run, ctx: dict) -> tuple[Path, Path]:
    """Intermediate LoRA first, then the checkpoint, which is the commit point a resume starts from."""
    from studio.engine.lora import lora_state_dicts

    ctx["phase"] = "saving"
    lora = lora_state_dicts(run.bundle)
    if not all_finite(lora):
        raise failures.NonFiniteLoss(run.position.step, run.job, ctx.get("lora_path"), what="the LoRA weights",
                                     checkpoint=ctx.get("checkpoint"), run_dir=run.folder.root,
                                     family=run.bundle.family.name)
    ctx["phase"] = "exporting"
    lora_path = _export(run, final=False)
    run.folder.prune_intermediate_loras(run.job.output.name, run.job.output.keep_last_loras)
    ctx["phase"] = "saving"
    meta = {"total_steps": run.total_steps, "elapsed": time.perf_counter() - ctx.get("started", time.perf_counter())}
    folder = save_checkpoint(run.folder.checkpoints, run.position, lora, run.optimizer, run.scheduler,
                             getattr(run.accelerator, "scaler", None), run.job.output.keep_last, job=run.job, meta=meta)
    ctx.update(lora_path=lora_path, checkpoint=folder, saved_step=run.position.step)
    ctx["phase"] = "training"
    return folder, lora_path


def _check_finite_weights(run: Run, ctx: dict) -> None:
    from studio.engine.lora import lora_state_dicts

    if run.is_main and not all_finite(lora_state_dicts(run.bundle)):
        raise failures.NonFiniteLoss(run.position.step, run.job, ctx.get("lora_path"), what="the LoRA weights",
                                     checkpoint=ctx.get("checkpoint"), run_dir=run.folder.root,
                                     family=run.bundle.family.name)


def _export(run: Run, *, final: bool) -> Path:
    """Write the LoRA file (main process only; callers hold the barriers)."""
    from studio.engine.export import export_diffusers_lora, export_lora, kohya_export_problem

    path = run.folder.lora_path(run.job.output.name, None if final else run.position.step)
    if run.is_main:
        if kohya_export_problem(run.bundle):
            # DoRA: only the diffusers/PEFT layout reproduces the trained model (preflight made sure it was asked for).
            export_diffusers_lora(run.bundle, path)
            return path
        export_lora(run.bundle, run.job, path, steps=run.position.step, tag_frequency=run.report.tag_frequency(),
                    dtype=run.job.output.save_dtype)
        if final and run.job.output.save_diffusers:
            export_diffusers_lora(run.bundle, path.with_name(path.stem + "-diffusers.safetensors"))
    return path


# --------------------------------------------------------------------------------------------- failures


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _failure_message(exc: BaseException, job: Job, ctx: dict) -> str:
    """The sentence for RunFailed; first saves the last completed step when that is safe, so nothing is lost."""
    phase = ctx.get("phase", "")
    saved = _rescue(exc, ctx)
    run = ctx.get("run")
    run_dir = ctx.get("run_dir")
    if failures.is_oom(exc) and run is not None:
        return str(failures.OutOfMemory(job, step=run.position.step, checkpoint=ctx.get("checkpoint"),
                                        last_good=ctx.get("lora_path"), run_dir=run_dir,
                                        during=failures.PHASES.get(phase, ""), saved_step=ctx.get("saved_step")))
    message = failures.explain(exc, job, phase)
    if saved is not None and run is not None:
        message += (f" The training state after step {run.position.step} is saved ({saved.name}); after fixing the "
                    f"cause, continue with `lora-studio train --resume {run_dir}`")
        message += " (add --sample-every 0 to train without previews)." if phase == "sampling" else "."
    return message


def _rescue(exc: BaseException, ctx: dict) -> Path | None:
    """Save a checkpoint of the last completed step after a failure, if the state is known to be whole.

    Not after a non-finite loss (those weights are suspect), not mid optimizer step (half-updated), not when
    the disk itself failed (it would fail again), and not under several processes (the others are not
    at a barrier to save with).
    """
    run: Run | None = ctx.get("run")
    if run is None or run.optimizer is None or not run.is_main or run.accelerator.num_processes > 1:
        return None
    if isinstance(exc, failures.NonFiniteLoss) or not ctx.get("consistent", False) or run.position.step == 0:
        return None
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return None
    if ctx.get("saved_step") == run.position.step:
        return ctx.get("checkpoint")
    try:
        run.optimizer.zero_grad(set_to_none=True)  # gradients are not saved: free them first (an OOM needs the room)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        folder, _ = _write_checkpoint(run, ctx)
        log.info("saved the state after step %d to %s after the failure", run.position.step, folder)
        return folder
    except Exception as second:  # the failure report matters more than the rescue
        log.warning("could not save a checkpoint after the failure: %s", second)
        return None


def _settle_failed_start(ctx: dict, resumed: bool) -> tuple[Path | None, Path | None]:
    """(run folder, log file) for the terminal event. A new run that ends before its first step and wrote nothing
    worth keeping removes its folder (so the next start gets the same name), keeping only its log, elsewhere."""
    run_dir = ctx.get("run_dir")
    log_file = run_dir / "logs" / "run.log" if run_dir else None
    if run_dir is None or resumed or ctx.get("step") or ctx.get("metrics") or "log_handler" not in ctx:
        return run_dir, log_file
    detach_log_file(ctx.pop("log_handler"))
    lock = ctx.pop("run_lock", None)
    if lock:
        lock.release()
    from studio.paths import user_data_dir

    kept = RunFolder(run_dir).discard_unused(user_data_dir() / "logs")
    if kept is None and not run_dir.exists():
        return None, None
    return (None, kept) if kept else (run_dir, log_file)


def _release(ctx: dict) -> None:
    """Free what the run held so the app can train again without restarting (GPU memory included)."""
    metrics = ctx.pop("metrics", None)
    if metrics:
        try:
            metrics.close()
        except OSError as exc:  # e.g. the disk filled up: the run already reported it
            log.warning("could not close metrics.jsonl: %s", exc)
    handler = ctx.pop("log_handler", None)
    if handler:
        detach_log_file(handler)
    lock = ctx.pop("run_lock", None)
    if lock:  # last of the run's files is closed: another process may take the run now
        lock.release()
    accelerator = ctx.pop("accelerator", None)
    ctx.pop("run", None)
    ctx.pop("bundle", None)
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
