"""A run's data: cached latents and text embeddings, batches in a reproducible order, the per-step seed."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch

from studio.engine import failures
from studio.engine.cache import cache_key
from studio.engine.events import LogMessage, StatusChanged, TrainEvent
from studio.engine.families import Conditioning
from studio.engine.run_state import Run

log = logging.getLogger(__name__)


def _latent_key(run: Run, index: int, flip: bool) -> str:
    item = run.report.items[index]
    return cache_key("latent-v1", item.sha256, run.buckets[index], flip, run.model_fp)


def _encode_latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    """VAE-encode one image at its bucket size; keep mean and std so each step can draw a fresh sample."""
    from studio.engine.dataset import load_image, prepare_image

    item = run.report.items[index]
    pixels, crop_tl, original_hw = prepare_image(load_image(item.image_path), run.buckets[index], flip=flip)
    with torch.no_grad():
        mean, std = run.bundle.family.encode_image(run.bundle, pixels.unsqueeze(0))
    return {
        "mean": mean[0].float(), "std": std[0].float(),
        "crop_tl": torch.tensor(crop_tl), "original_hw": torch.tensor(original_hw),
    }


def _checked_latent(run: Run, index: int, flip: bool) -> dict[str, torch.Tensor]:
    # Caching moves every latent to the host anyway, so checking it here costs no extra sync; a NaN latent
    # would otherwise surface many steps later as a NaN loss with no hint that the VAE caused it.
    value = _encode_latent(run, index, flip)
    if not (torch.isfinite(value["mean"]).all() and torch.isfinite(value["std"]).all()):
        item = run.report.items[index]
        raise failures.NonFiniteLatent(_rel(item.image_path, run.report.root), run.bundle.family)
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


def cache_latents(run: Run) -> Iterator[TrainEvent]:
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
    t = run.job.training
    options = () if (t.max_token_length, t.clip_skip) == (75, 1) else (t.max_token_length, t.clip_skip)
    storage = run.bundle.extra.get("text_storage")  # fp8 T5 encodes a little differently (Family.store_frozen_on_host)
    options += (storage,) if storage else ()
    return cache_key("text-v1", caption, run.model_fp, *options)  # the defaults keep earlier caches valid


def encode_text(run: Run, captions: list[str]) -> Conditioning:
    return run.bundle.family.encode_text(run.bundle, captions)


def encode_text_for_training(run: Run, captions: list[str]) -> Conditioning:
    """Encode through the text encoders as accelerate prepared them (DDP-wrapped under several processes), so
    a trained text encoder's LoRA gradients are all-reduced like the denoiser's; the very same modules otherwise."""
    if not run.te_ddp:
        return encode_text(run, captions)
    return run.bundle.family.encode_text(dataclasses.replace(run.bundle, text_encoders=list(run.te_ddp)), captions)


def _cached_text(run: Run, caption: str) -> Conditioning:
    def compute() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond = encode_text(run, [caption])
        return {name: value[0].float() for name, value in cond.tensors.items()}

    value = run.text.get_or_compute(_text_key(run, caption), compute)
    return Conditioning({name: tensor.unsqueeze(0) for name, tensor in value.items()})


def cache_text(run: Run) -> Iterator[TrainEvent]:
    captions = sorted({item_caption(run, i, random.Random(0), dropout=False) for i in range(len(run.report.items))})
    if run.job.dataset.caption_dropout > 0:
        captions.append("")
    for n, caption in enumerate(captions):
        _cached_text(run, caption)
        if n % 16 == 0 or n == len(captions) - 1:
            yield StatusChanged("Caching text embeddings", f"{n + 1} / {len(captions)} captions", (n + 1) / len(captions))
    # Nothing else needs the frozen text encoders on the accelerator until previews, which move them back unless
    # the family can take its preview prompts encoded now (Flux, SD3: T5-XXL would not fit beside the model).
    if run.is_main and run.job.sampling.every and run.prompts:
        from studio.engine.sampling import cache_preview_embeds

        cache_preview_embeds(run.bundle, run.prompts, run.job.sampling.negative_prompt, run.weight_dtype)
    if run.device.type != "cpu":
        for te in run.bundle.text_encoders:
            te.to("cpu")
        run.bundle.extra["text_encoders_offloaded"] = True


# ------------------------------------------------------------------------------------ the caches the step reads

# Device memory the resident caches may take, as a share of what is free after the model is loaded: they are small
# (an SDXL latent's mean and std are 0.5 MB), but activations need the room more.
RESIDENT_SHARE = 0.25


def make_resident(run: Run) -> None:
    """Move what each step reads (cached latents, per-image conditioning, static text) to where the step needs it.

    On the device when it fits, else pinned host memory, which the step copies with ``non_blocking=True``: either
    way the step never waits for a pageable host→device copy. On the CPU the entries are the cached tensors.
    Only with cached latents; without, every step reads and encodes images on the host anyway.
    """
    if not run.job.training.cache_latents:
        return
    flips = (False, True) if run.job.dataset.random_flip else (False,)
    store: dict = {}
    for index in range(len(run.report.items)):
        w, h = run.buckets[index]
        for flip in flips:
            entry = _latent(run, index, flip)
            extra = run.bundle.family.example_conditioning([entry], (h, w))
            store[("latent", index, flip)] = {"mean": entry["mean"], "std": entry["std"],
                                              **{f"cond:{k}": v for k, v in extra.items()}}
    if run.text_is_static:
        for caption in {item_caption(run, i, random.Random(0), dropout=False) for i in range(len(run.report.items))} | (
                {""} if run.job.dataset.caption_dropout > 0 else set()):
            store[("text", caption)] = {f"cond:{k}": v for k, v in _cached_text(run, caption).tensors.items()}
    for entry in store.values():  # conditioning in the compute dtype once, not every step
        for k, v in entry.items():
            if k.startswith("cond:") and v.is_floating_point():
                entry[k] = v.to(run.weight_dtype)
    on_device = run.device.type != "cpu" and _fits(run, store)
    if run.device.type != "cpu":
        place = (lambda t: t.to(run.device)) if on_device else (lambda t: t.pin_memory())
        store = {key: {k: place(v) for k, v in entry.items()} for key, entry in store.items()}
    run.resident, run.resident_on_device = store, on_device or run.device.type == "cpu"
    log.info("step inputs: %d cached entries %s", len(store),
             "on the device" if on_device else "in pinned memory" if run.device.type != "cpu" else "on the CPU")


def _fits(run: Run, store: dict) -> bool:
    size = sum(v.numel() * v.element_size() for entry in store.values() for v in entry.values())
    if run.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(run.device)
        return size <= RESIDENT_SHARE * free
    return False  # MPS and others: no free-memory query worth trusting; pinned copies are safe everywhere


def _resident(run: Run, tensor: torch.Tensor) -> torch.Tensor:
    """A resident entry on the device: as it is, or a non-blocking copy from pinned memory."""
    return tensor if run.resident_on_device else tensor.to(run.device, non_blocking=True)


def _resident_inputs(run: Run, batch: list[int], flips: list[bool], captions: list[str],
                     gen: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
    entries = [run.resident[("latent", i, f)] for i, f in zip(batch, flips)]
    mean = torch.stack([_resident(run, e["mean"]) for e in entries])
    std = torch.stack([_resident(run, e["std"]) for e in entries])
    latents = mean + std * torch.randn(mean.shape, generator=gen, device=gen.device)
    names = [k for k in entries[0] if k.startswith("cond:")]
    per_image = {k[5:]: torch.cat([_resident(run, e[k]) for e in entries]) for k in names}
    if run.text_is_static:
        texts = [run.resident[("text", c)] for c in captions]
        text = {k[5:]: torch.cat([_resident(run, t[k]) for t in texts]) for k in texts[0]}
    else:
        with torch.no_grad() if not run.job.lora.train_text_encoder else nullcontext():
            text = encode_text_for_training(run, captions).to(run.device, run.weight_dtype).tensors
    return latents, Conditioning({**text, **per_image})


# ------------------------------------------------------------------------------------------- data order


def epoch_batches(run: Run, epoch: int) -> list[list[int]]:
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


def next_batch(run: Run, cache: dict) -> list[int]:
    p = run.position
    while True:
        if cache.get("epoch") != p.epoch:
            cache["epoch"], cache["batches"] = p.epoch, epoch_batches(run, p.epoch)
        if p.batch_index < len(cache["batches"]):
            batch = cache["batches"][p.batch_index]
            p.batch_index += 1
            return batch
        p.epoch, p.batch_index = p.epoch + 1, 0


# ------------------------------------------------------------------------------------------- a step's data


def make_generator(run: Run, seed: int) -> torch.Generator:
    """A generator on the run's device, seeded from ``seed``.

    Noise drawn on the device needs no host→device copy (which would make the host wait); seeded from (seed, step)
    it still makes every step a pure function of its seed, so exact resume holds. On the CPU it is the CPU
    generator with the same seed as before, so CPU results are bit-identical to drawing on the host.
    """
    return torch.Generator(device=run.device).manual_seed(seed)


def step_seed(run: Run, micro: int) -> int:
    return (run.job.training.seed * 7919 + run.position.step * 104_729 + micro * 31 + run.accelerator.process_index) % (2**63)


def item_caption(run: Run, index: int, rng: random.Random, *, dropout: bool = True) -> str:
    from studio.engine.dataset import compose_caption

    d = run.job.dataset
    return compose_caption(run.report.items[index].caption, trigger_word=d.trigger_word, shuffle_tags=d.shuffle_tags,
                           keep_tokens=d.keep_tokens, dropout=d.caption_dropout if dropout else 0.0, rng=rng)


def batch_inputs(run: Run, batch: list[int], micro: int) -> tuple[torch.Tensor, Conditioning]:
    """Latents (freshly sampled from the cached distribution) and the conditioning: text, plus what the family
    derives per image (e.g. SDXL's size and crop ids)."""
    seed = step_seed(run, micro)
    rng = random.Random(seed)
    gen = make_generator(run, seed)
    flips = [run.job.dataset.random_flip and rng.random() < 0.5 for _ in batch]
    if run.resident is not None:
        return _resident_inputs(run, batch, flips, [item_caption(run, i, rng) for i in batch], gen)
    entries = [_latent(run, i, f) for i, f in zip(batch, flips)]
    mean = torch.stack([e["mean"] for e in entries])
    std = torch.stack([e["std"] for e in entries])
    latents = (mean + std * torch.randn(mean.shape, generator=gen, device=gen.device)).to(run.device, non_blocking=True)
    captions = [item_caption(run, i, rng) for i in batch]
    if run.text_is_static:
        cond = Conditioning.cat([_cached_text(run, c) for c in captions])
    else:
        with torch.no_grad() if not run.job.lora.train_text_encoder else nullcontext():
            cond = encode_text_for_training(run, captions)
    w, h = run.buckets[batch[0]]
    cond = cond.with_tensors(**run.bundle.family.example_conditioning(entries, (h, w)))
    return latents, cond.to(run.device, run.weight_dtype)
