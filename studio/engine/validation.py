"""Validation loss: held-out (or the user's own) images, a fixed-noise, fixed-timestep denoising loss, the best step.

The loss is the family's own ``training_loss`` (so it works for every family and weighs timesteps the way training
does), evaluated without gradients in eval mode, with generators seeded from fixed numbers: every evaluation sees
the same latents, noise and timesteps, so the curve moves only when the weights do, and a resumed run measures
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from studio.engine import failures
from studio.engine.config import Job, Problem
from studio.engine.families import Conditioning
from studio.engine.run_state import Run

log = logging.getLogger(__name__)

# Fixed, independent of the training seed: runs with different seeds are compared on the same noise.
_NOISE_SEED = 0x5A11D


@dataclass
class ValidationGroup:
    """Validation images of one bucket size, ready for the denoiser: latent means and (when static) conditioning."""

    latents: torch.Tensor
    size_hw: tuple[int, int]  # the bucket in pixels, (height, width)
    captions: list[str]
    examples: list[dict[str, torch.Tensor]]  # the latent-cache entries the family derives per-image conditioning from
    cond: Conditioning | None = None  # None: the text encoders train, so the captions are encoded at each evaluation


@dataclass
class ValidationSet:
    groups: list[ValidationGroup] = field(default_factory=list)
    source: str = ""  # for the log: "3 held-out images" or the folder

    @property
    def count(self) -> int:
        return sum(len(g.captions) for g in self.groups)


def enabled(job: Job) -> bool:
    v = job.validation
    return v.every > 0 and (bool(v.folder.strip()) or v.split > 0)


def held_out_count(split: float, usable: int) -> int:
    """How many of ``usable`` images a split holds out: a share below 1 (at least one image), else a count."""
    if split <= 0:
        return 0
    return max(1, round(split * usable)) if split < 1 else int(split)


def split_items(job: Job, items: list) -> tuple[list, list]:
    """(train, held out) from the scanned items (held out whenever a split is set, measured or not: which images
    train must not depend on whether the loss is measured).

    The held-out images are chosen by a hash of their content, not by the seed or the folder order: the same images
    stay out when the seed changes or files are renamed, so runs on one dataset compare on one validation set.
    """
    n = 0 if job.validation.folder.strip() else held_out_count(job.validation.split, len(items))
    if n == 0:
        return list(items), []
    if n >= len(items):
        raise failures.JobInvalid([Problem(
            "validation.split", f"holding out {n} of the {len(items)} usable images leaves none to train on; hold out "
            "fewer (e.g. 0.1), or point validation.folder at separate images")])
    rank = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"validation:{items[i].sha256}".encode()).digest())
    held = set(rank[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def validation_items(run: Run, held_out: list) -> tuple[list, str]:
    """The items to validate on (at most ``validation.images``) and where they come from, for the log."""
    from studio.engine.dataset import scan_dataset

    job = run.job
    v, d = job.validation, job.dataset
    if not enabled(job):
        return [], ""
    if v.folder.strip():
        report = scan_dataset(v.folder, caption_extension=d.caption_extension, trigger_word=d.trigger_word)
        if not report.items:
            raise failures.JobInvalid([Problem(
                "validation.folder", f"'{v.folder}' has no usable images; add .png/.jpg/.webp images (with captions) "
                "or clear the field to hold out training images instead")])
        items, source = report.items, f"the images in {v.folder}"
    else:
        items, source = held_out, "images held out from training"
    items = sorted(items, key=lambda item: str(item.image_path))[: v.images]
    return items, f"{len(items)} {source}"


def prepare(run: Run, items: list, source: str) -> ValidationSet | None:
    """Encode the validation images (latent means: no sampling noise) and, when the text is static, their captions.

    Kept on the device: a handful of latents and embeddings, read every evaluation.
    """
    from studio.engine.buckets import plan_buckets, prepare_image
    from studio.engine.dataset import compose_caption, load_image

    if not items:
        return None
    job, bundle = run.job, run.bundle
    d = job.dataset
    buckets = plan_buckets(items, d.resolution, d.bucket_step, d.buckets)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(i)
    out = ValidationSet(source=source)
    chunk = max(1, job.training.batch_size)
    for (w, h), indices in by_bucket.items():
        for k in range(0, len(indices), chunk):
            part = indices[k:k + chunk]
            means, examples, captions = [], [], []
            for i in part:
                pixels, crop_tl, original_hw = prepare_image(load_image(items[i].image_path), (w, h), flip=False)
                with torch.no_grad():
                    mean, _ = bundle.family.encode_image(bundle, pixels.unsqueeze(0))
                means.append(mean[0].float())
                examples.append({"crop_tl": torch.tensor(crop_tl), "original_hw": torch.tensor(original_hw)})
                captions.append(compose_caption(items[i].caption, trigger_word=d.trigger_word))
            group = ValidationGroup(torch.stack(means).to(run.device), (h, w), captions, examples)
            if not job.lora.train_text_encoder:
                group.cond = _conditioning(run, group)
            out.groups.append(group)
    return out


def _conditioning(run: Run, group: ValidationGroup) -> Conditioning:
    from studio.engine.run_data import encode_text

    bundle = run.bundle
    with torch.no_grad():
        cond = encode_text(run, group.captions)
    cond = cond.with_tensors(**bundle.family.example_conditioning(group.examples, group.size_hw))
    return cond.to(run.device, run.weight_dtype)


def generator(run: Run, seed: int) -> torch.Generator:
    """A generator on the device the family draws noise on (see run_data.step_generator)."""
    from studio.engine.run_data import make_generator

    return make_generator(run, seed)


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The mean denoising loss over the validation images × ``validation.timesteps`` fixed noise draws.

    Eval mode (LoRA dropout off) and no gradients; the training modes are restored afterwards. Reads the result back
    once (one device sync per evaluation, every ``validation.every`` steps).
    """
    vs: ValidationSet = run.validation
    bundle, job = run.bundle, run.job
    modules = [bundle.denoiser] + (list(bundle.text_encoders) if job.lora.train_text_encoder else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    total = torch.zeros((), device=run.device, dtype=torch.float32)
    count = 0
    try:
        for g, group in enumerate(vs.groups):
            cond = group.cond if group.cond is not None else _conditioning(run, group)
            n = group.latents.shape[0]
            for j in range(job.validation.timesteps):
                gen = generator(run, _NOISE_SEED + 1009 * g + j)
                loss = bundle.family.training_loss(bundle, bundle.denoiser, group.latents, cond, training=job.training,
                                                   generator=gen, weight_dtype=run.weight_dtype)
                total += loss.float() * n
                count += n
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return float(total / max(count, 1))


def best(points: Iterable[tuple[int, float]]) -> tuple[int, float] | None:
    """The (step, loss) with the lowest finite validation loss; the earliest on a tie."""
    found = None
    for step, loss in points:
        if math.isfinite(loss) and (found is None or loss < found[1]):
            found = (step, loss)
    return found


def best_from_metrics(records: Iterable[dict]) -> tuple[int, float] | None:
    """The best (step, validation loss) recorded in metrics.jsonl (its ``val_loss`` entries)."""
    return best((int(r["step"]), float(r["val_loss"])) for r in records
                if isinstance(r.get("val_loss"), (int, float)) and isinstance(r.get("step"), int))
