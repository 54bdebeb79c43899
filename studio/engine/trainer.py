"""run_training(job, stop) -> a stream of TrainEvents: load, scan, cache, inject LoRA, train, sample, save, export."""

from __future__ import annotations

import logging
import math
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
from studio.engine.config import Job, errors, validate
from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
    StepCompleted, TrainEvent,
)
from studio.engine.optim import make_optimizer
from studio.engine.families import Conditioning, encode_prompts, sdxl_time_ids, unet_added_cond
from studio.engine.runs import MetricsWriter, RunFolder, attach_log_file, detach_log_file, new_run_dir
from studio.engine.state import TrainPosition, latest_checkpoint, load_checkpoint, save_checkpoint

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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


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
    from its latest checkpoint.
    """
    stop = stop or threading.Event()
    pause = pause or threading.Event()
    ctx: dict[str, Any] = {}
    try:
        yield from _train(job, stop, pause, resume_dir, ctx)
    except Cancelled:
        yield RunCancelled(ctx.get("step", 0), ctx.get("run_dir"), ctx.get("lora_path"))
    except BaseException as exc:  # every failure becomes an event with a way out, never a silent exit
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        message = failures.explain(exc, job)
        log.error("run failed: %s\n%s", message, traceback.format_exc())
        run_dir = ctx.get("run_dir")
        yield RunFailed(
            message, traceback.format_exc(), run_dir, (run_dir / "logs" / "run.log") if run_dir else None,
            ctx.get("lora_path"),
        )
    finally:
        _release(ctx)


def _train(job: Job, stop: threading.Event, pause: threading.Event, resume_dir: Path | None, ctx: dict) -> Iterator[TrainEvent]:
    problems = errors(validate(job))
    if problems:
        raise failures.JobInvalid(problems)
    run = yield from _setup(job, stop, resume_dir, ctx)
    yield RunStarted(run.folder.root, run.total_steps, run.bundle.family.name, devices.describe_device(run.device),
                     run.report.usable, run.position.step, job)
    yield from _train_loop(run, stop, pause, ctx)
    lora_path = _export(run, final=True)
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

    # The main process picks the (never overwritten) run folder; the others learn its name.
    chosen = [str(resume_dir) if resume_dir else str(new_run_dir(Path(job.output.dir)))]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    folder = RunFolder(Path(chosen[0]))
    ctx["run_dir"] = folder.root
    if accelerator.is_main_process:
        folder.create(job)
        ctx["log_handler"] = attach_log_file(folder)
    log.info("run folder %s, %d process(es) on %s, precision %s", folder.root, accelerator.num_processes,
             accelerator.device, mixed)

    yield StatusChanged("Loading model", job.model.path)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    bundle = load_model(job.model, dtype=weight_dtype, device=accelerator.device)
    ctx["bundle"] = bundle
    # The VAE runs in fp32: SDXL's VAE overflows in fp16 and the VAE is used only for caching and previews.
    bundle.vae.to(accelerator.device, torch.float32)
    log.info("loaded %s (%s, %s) in %.1f s", bundle.source, bundle.family.label, bundle.prediction_type, bundle.load_time_s)
    yield LogMessage("info", f"Model: {bundle.family.label}, {bundle.prediction_type} prediction, loaded in {bundle.load_time_s:.1f} s")

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

    if t.cache_latents:
        yield from _cache_latents(run)
    if run.text_is_static:
        yield from _cache_text(run)
    if stop.is_set():
        raise Cancelled()

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
        _restore(run)
        yield LogMessage("info", f"Resumed at step {run.position.step} from {resume_dir}")
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


def _restore(run: Run) -> None:
    from studio.engine.lora import load_lora_state_dicts

    folder = latest_checkpoint(run.folder.checkpoints)
    if folder is None:
        raise failures.NothingToResume(run.folder.root)
    position, lora, state = load_checkpoint(folder)
    load_lora_state_dicts(run.bundle, lora)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(run.accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    run.position = position


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


def _latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    key = _latent_key(run, index, flip)
    if run.job.training.cache_latents:
        return run.latents.get_or_compute(key, lambda: _encode_latent(run, index, flip))
    return _encode_latent(run, index, flip)


def _cache_latents(run: Run) -> Iterator[TrainEvent]:
    flips = (False, True) if run.job.dataset.random_flip else (False,)
    todo = [(i, f) for i in range(len(run.report.items)) for f in flips]
    # With a disk cache the main process encodes first; the others then read what it wrote.
    for turn in ("main", "others"):
        if (turn == "main") == run.is_main:
            started = time.perf_counter()
            for n, (index, flip) in enumerate(todo):
                _latent(run, index, flip)
                if n % 8 == 0 or n == len(todo) - 1:
                    yield StatusChanged("Caching latents", f"{n + 1} / {len(todo)} images", (n + 1) / len(todo))
            log.info("latent cache: %d entries (%d reused) in %.1f s", len(todo), run.latents.hits,
                     time.perf_counter() - started)
        run.accelerator.wait_for_everyone()


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


def _train_step(run: Run, data_cache: dict) -> torch.Tensor:
    """Forward, backward and optimizer step over ``gradient_accumulation`` micro-batches; returns the loss (on device)."""
    t, acc = run.job.training, run.accelerator
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
    if t.max_grad_norm > 0:
        acc.clip_grad_norm_([p for ps in run.params.values() for p in ps], t.max_grad_norm)
    run.optimizer.step()
    if not acc.optimizer_step_was_skipped:  # fp16 overflow skips the step; the schedule must not move then
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total


# ------------------------------------------------------------------------------------------------ the loop


def _train_loop(run: Run, stop: threading.Event, pause: threading.Event, ctx: dict) -> Iterator[TrainEvent]:
    t, s, o = run.job.training, run.job.sampling, run.job.output
    metrics = MetricsWriter(run.folder, run.position.step) if run.is_main else None
    ctx["metrics"] = metrics
    pending: list[tuple[int, torch.Tensor, float, float]] = []  # (step, loss on device, lr, time): synced in batches
    recent: deque[float] = deque(maxlen=20)
    data_cache: dict = {}
    started, last_flush = time.perf_counter(), time.perf_counter()
    ctx["elapsed"] = 0.0
    if s.every and run.position.step == 0:
        yield from _sample(run)  # step-0 previews: the base model, to compare against
    yield StatusChanged("Training", f"{run.total_steps - run.position.step} steps to go")
    for module in [run.bundle.unet] + (run.bundle.text_encoders if run.job.lora.train_text_encoder else []):
        module.train()
    while run.position.step < run.total_steps:
        step_started = time.perf_counter()
        loss = _train_step(run, data_cache)
        run.position.step += 1
        ctx["step"] = step = run.position.step
        recent.append(time.perf_counter() - step_started)
        pending.append((step, loss, run.scheduler.get_last_lr()[0], time.perf_counter() - started))
        at_sample = bool(s.every) and step % s.every == 0
        at_save = bool(o.save_every) and step % o.save_every == 0 and step < run.total_steps
        # Reading the loss forces a device sync: do it on the CPU every step, elsewhere a few times a second.
        if run.device.type == "cpu" or at_sample or at_save or stop.is_set() or pause.is_set() \
                or step == run.total_steps or time.perf_counter() - last_flush > 0.5:
            yield from _flush(run, pending, recent, metrics, started, ctx)
            last_flush = time.perf_counter()
        if at_save:
            yield _save(run, ctx)
        if at_sample or (s.every and step == run.total_steps and step % s.every):
            yield from _sample(run)
        if pause.is_set() and not stop.is_set():
            yield _save(run, ctx)
            yield StatusChanged("Paused", f"at step {step}; the model stays loaded")
            while pause.is_set() and not stop.is_set():
                time.sleep(0.05)
            yield StatusChanged("Training", "resumed")
        if stop.is_set() and step < run.total_steps:
            yield _save(run, ctx)
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
            raise failures.NonFiniteLoss(step, run.job, ctx.get("lora_path"))
        rate = len(recent) / max(sum(recent), 1e-9)
        eta = (run.total_steps - step) / rate
        if metrics:
            metrics.write(step, loss, lr, when)
        yield StepCompleted(step, run.total_steps, loss, lr, time.perf_counter() - started, rate, eta,
                            run.position.epoch)
    if metrics:
        metrics.flush()
    pending.clear()


def _sample(run: Run) -> Iterator[TrainEvent]:
    from studio.engine.sampling import render, sample_file_name, save_png

    if not run.is_main:
        return
    s, d = run.job.sampling, run.job.dataset
    te_offloaded = run.bundle.extra.pop("text_encoders_offloaded", False)
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
    if te_offloaded:
        for te in run.bundle.text_encoders:
            te.to("cpu")
        run.bundle.extra["text_encoders_offloaded"] = True
    yield StatusChanged("Training", f"step {step} / {run.total_steps}")


def _save(run: Run, ctx: dict) -> CheckpointSaved:
    """A resumable checkpoint plus an intermediate LoRA named by step (main process only writes)."""
    from studio.engine.lora import lora_state_dicts

    step = run.position.step
    run.accelerator.wait_for_everyone()
    folder = lora_path = None
    if run.is_main:
        folder = save_checkpoint(run.folder.checkpoints, run.position, lora_state_dicts(run.bundle), run.optimizer,
                                 run.scheduler, getattr(run.accelerator, "scaler", None), run.job.output.keep_last)
        lora_path = _export(run, final=False)
        ctx["lora_path"] = lora_path
    return CheckpointSaved(step, folder or run.folder.checkpoints, lora_path)


def _export(run: Run, *, final: bool) -> Path:
    from studio.engine.export import export_diffusers_lora, export_lora

    path = run.folder.lora_path(run.job.output.name, None if final else run.position.step)
    if run.is_main:
        export_lora(run.bundle, run.job, path, steps=run.position.step, tag_frequency=run.report.tag_frequency(),
                    dtype=run.job.output.save_dtype)
        if final and run.job.output.save_diffusers:
            export_diffusers_lora(run.bundle, path.with_name(path.stem + "-diffusers.safetensors"))
    run.accelerator.wait_for_everyone()
    return path


def _release(ctx: dict) -> None:
    """Free what the run held so the app can train again without restarting (GPU memory included)."""
    metrics = ctx.pop("metrics", None)
    if metrics:
        metrics.close()
    handler = ctx.pop("log_handler", None)
    if handler:
        detach_log_file(handler)
    accelerator = ctx.pop("accelerator", None)
    ctx.pop("run", None)
    ctx.pop("bundle", None)
    if accelerator is not None:
        accelerator.free_memory()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
