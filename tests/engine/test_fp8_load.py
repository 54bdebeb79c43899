"""fp8 base weights at load (Flux, SD3.5 Large): only fp8 frozen weights ever reach the device, swapped blocks' never,
and the training step is the one casting after the move gave (which put the whole bf16 transformer on the device).

A CPU has no second device, so every tensor move is watched instead: ``Tensor.to`` is wrapped for the whole real
run set-up (``run_setup.setup``), and each move of a denoiser weight is recorded with the dtype it had when it moved.
``Module.to`` (load_model's, accelerate's) moves tensors through the same ``Tensor.to``, so none escapes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from studio.engine import run_setup
from studio.engine.config import LoraSection, ModelSection, TrainingSection
from studio.engine.families import memory
from studio.engine.lora import inject_lora
from test_trainer import tiny_job

FP8 = torch.float8_e4m3fn
FAMILIES = ("flux-dev", "sd3.5-large", "qwen-image")


def _name(name: str) -> str:
    return name.replace(".base_layer", "")  # peft's wrapper renames the weights it wraps


class Moves:
    """Every ``Tensor.to(<device>)`` of a weight of the run's denoiser: name → [(dtype, bytes)] in order."""

    def __init__(self) -> None:
        self.bundle = None
        self.seen: dict[str, list[tuple[torch.dtype, int]]] = {}

    def record(self, tensor: torch.Tensor) -> None:
        if self.bundle is None or tensor.numel() == 0:
            return
        ptr = tensor.untyped_storage().data_ptr()
        for name, p in self.bundle.denoiser.named_parameters():
            if p.numel() and p.untyped_storage().data_ptr() == ptr:
                self.seen.setdefault(_name(name), []).append((tensor.dtype, tensor.numel() * tensor.element_size()))
                return


def _device_of(args, kwargs):
    target = kwargs.get("device")
    if target is None and args and isinstance(args[0], (torch.device, str)):
        target = args[0]
    if target is None and args and isinstance(args[0], torch.Tensor):
        target = args[0].device
    return target


@contextmanager
def watched_setup(job, monkeypatch):
    """The real run set-up with every tensor move recorded; yields (run, moves)."""
    from studio.engine.recovery import release
    from studio.engine.run_state import Run

    from studio.engine import checkpoint

    moves = Moves()
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if _device_of(args, kwargs) is not None:
            moves.record(self)
        return real_to(self, *args, **kwargs)

    def watching(load):  # the family's loader, so that load_model's own moves are seen too
        def loaded(*args, **kwargs):
            moves.bundle = load(*args, **kwargs)
            return moves.bundle
        return loaded

    for loader in ("_load_folder", "_load_single_file"):
        monkeypatch.setattr(checkpoint, loader, watching(getattr(checkpoint, loader)))
    monkeypatch.setattr(torch.Tensor, "to", to)
    run = Run(job)
    try:
        list(run_setup.setup(run, threading.Event(), None))
        monkeypatch.setattr(torch.Tensor, "to", real_to)
        yield run, moves
    finally:
        monkeypatch.setattr(torch.Tensor, "to", real_to)
        release(run)


def _fp8_job(family, tiny_model, tiny_dataset, tmp_path, **training):
    fields = {"training__" + k: v for k, v in {"base_weights_fp8": True, "mixed_precision": "bf16", **training}.items()}
    return tiny_job(tiny_model(family, "flow"), tiny_dataset, tmp_path / "run", **fields)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_swap", [0, 1])
def test_only_fp8_frozen_weights_reach_the_device(family, block_swap, tiny_model, tiny_dataset, tmp_path, monkeypatch,
                                                  fresh_accelerate_state):
    job = _fp8_job(family, tiny_model, tiny_dataset, tmp_path, block_swap=block_swap,
                   gradient_checkpointing=bool(block_swap))
    with watched_setup(job, monkeypatch) as (run, moves):
        denoiser = run.bundle.denoiser
        frozen = {_name(n): p for n, p in denoiser.named_parameters() if not p.requires_grad}
        lora = [p for p in denoiser.parameters() if p.requires_grad]
        device = run.device
        swapped = {_name(n) for n, p in denoiser.named_parameters() if not p.requires_grad and any(
            p is q for b in (run.bundle.extra["block_swap"].blocks if block_swap else []) for q in b.parameters())}
    cast = {n for n, p in frozen.items() if p.dtype == FP8}
    assert len(cast) > 0.5 * len(frozen)  # every Linear's weight and bias; norms and embeddings stay bf16
    assert len(swapped) > 0 if block_swap else not swapped
    # Each frozen weight outside the swapped blocks moved exactly once, already in the dtype it is kept in (fp8 for
    # the cast ones: 1 byte per parameter); the swapped blocks' frozen weights did not move at all.
    moved = {n: m for n, m in moves.seen.items() if n in frozen}
    assert set(moved) == set(frozen) - swapped
    for name, record in moved.items():
        assert record == [(frozen[name].dtype, frozen[name].numel() * frozen[name].element_size())], name
    fp8_bytes = sum(b for n, m in moved.items() if n in cast for _, b in m)
    assert fp8_bytes == sum(frozen[n].numel() for n in cast - swapped)
    total = sum(b for m in moved.values() for _, b in m)
    bf16_total = sum(p.numel() * 2 for n, p in frozen.items() if n not in swapped)
    assert total == bf16_total - fp8_bytes  # 1 byte instead of 2 for each cast weight; norms and embeddings at 2
    assert lora and all(p.dtype == torch.float32 and p.device == device for p in lora)
    print(f"{family}, {block_swap} block(s) swapped: {total} B of frozen weights moved to the device "
          f"(as bf16 it would be {bf16_total} B); {len(cast - swapped)} fp8 tensors, {fp8_bytes} B at 1 byte/param; "
          f"{len(swapped)} swapped-block tensors stayed on the host")


def _loss_and_grads(bundle, latents, cond, training):
    bundle.denoiser.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=training,
                                           generator=torch.Generator().manual_seed(11), weight_dtype=torch.bfloat16)
    loss.backward()
    # Qwen-Image's last block's text-stream outputs (to_add_out, txt_mlp) feed nothing: their LoRA gets no gradient.
    return loss.detach(), {_name(n): p.grad.clone() for n, p in bundle.denoiser.named_parameters()
                           if p.requires_grad and p.grad is not None}


def _cast_after_move(folder, training, seed):
    """What the run did before: the whole bf16 denoiser on the device, the LoRA added, then fp8 and block swap."""
    from studio.engine.checkpoint import load_model

    bundle = load_model(ModelSection(path=str(folder)), dtype=torch.bfloat16, device="cpu")
    torch.manual_seed(seed)
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0), train_text_encoder=False)
    memory.store_frozen_in_fp8(bundle.denoiser, torch.bfloat16)
    if training.gradient_checkpointing:
        bundle.denoiser.enable_gradient_checkpointing()
    blocks = [m for name, m in bundle.denoiser.named_children() if name.endswith("transformer_blocks")]
    memory.swap_blocks([b for group in blocks for b in group], training.block_swap, "cpu")
    return bundle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_swap", [0, 1])
def test_the_step_equals_casting_after_the_move(family, block_swap, tiny_model, tiny_dataset, tmp_path, monkeypatch,
                                                fresh_accelerate_state):
    """Same LoRA start, same fp8 weights, same loss and LoRA gradients, bit for bit (the LoRA is still added before
    the cast, from bf16 weights: casting first would start it from fp8-rounded values, and DoRA could not start)."""
    job = _fp8_job(family, tiny_model, tiny_dataset, tmp_path, block_swap=block_swap,
                   gradient_checkpointing=bool(block_swap))
    gen = torch.Generator().manual_seed(3)
    with watched_setup(job, monkeypatch) as (run, _):
        new = run.bundle
        channels = new.denoiser.config.in_channels // (4 if family.startswith(("flux", "qwen")) else 1)  # packed 2x2
        latents = (torch.randn(2, channels, 16, 16, generator=gen) * 0.5).to(torch.bfloat16)
        with torch.no_grad():
            cond = new.family.encode_text(new, ["a red circle", "a blue square"]).to("cpu", torch.bfloat16)
        loss_new, grads_new = _loss_and_grads(new, latents, cond, job.training)
    old = _cast_after_move(tiny_model(family, "flow"), job.training, job.training.seed)
    assert {n: p.dtype for n, p in old.denoiser.named_parameters()} == {n: p.dtype for n, p in new.denoiser.named_parameters()}
    loss_old, grads_old = _loss_and_grads(old, latents, cond, job.training)
    assert torch.isfinite(loss_new) and torch.equal(loss_new, loss_old)
    assert grads_new.keys() == grads_old.keys() and all(torch.equal(grads_new[k], grads_old[k]) for k in grads_new)
    print(f"{family}, block swap {block_swap}: loss {float(loss_new):.6f} and {len(grads_new)} LoRA gradients equal")


def test_an_fp8_file_keeps_its_weights_exactly(comfy_tree, tiny_dataset, tmp_path, monkeypatch, fresh_accelerate_state):
    """A FLUX.1 transformer file stored in float8_e4m3fn: diffusers reads it into bf16 on the host (exact: e4m3 values
    are bf16 values), the cast back is exact too, and the device only sees the file's own fp8 bytes."""
    from safetensors.torch import load_file

    folder, models = comfy_tree
    path = models / "unet" / "tiny-flux1-dev-fp8.safetensors"
    job = tiny_job(path, tiny_dataset, tmp_path / "run", training__base_weights_fp8=True,
                   training__mixed_precision="bf16")
    job.model.config_dir = str(folder)
    stored = load_file(str(path))
    with watched_setup(job, monkeypatch) as (run, moves):
        frozen = {_name(n): p for n, p in run.bundle.denoiser.named_parameters() if not p.requires_grad}
    cast = {n: p for n, p in frozen.items() if p.dtype == FP8}
    assert cast and set(cast) <= set(stored)
    for name, p in cast.items():
        assert torch.equal(p.view(torch.uint8), stored[name].view(torch.uint8)), name
        assert moves.seen[name] == [(FP8, p.numel())]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_run_with_fp8_and_block_swap_trains_and_previews(family, tiny_model, tiny_dataset, tmp_path,
                                                                 fresh_accelerate_state):
    """The order the run now loads in (denoiser placed last), end to end: two steps, a preview (text encoders back on
    the device beside the fp8 denoiser), the LoRA written."""
    from studio.engine.events import RunFinished, SampleReady, StepCompleted
    from studio.engine.trainer import run_training

    job = _fp8_job(family, tiny_model, tiny_dataset, tmp_path, block_swap=2, gradient_checkpointing=True)
    job.training.steps = 2
    job.sampling.every = 2
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    assert len([e for e in events if isinstance(e, StepCompleted)]) == 2
    assert {e.step for e in events if isinstance(e, SampleReady)} == {0, 2}  # the base model's, then step 2's
    assert events[-1].lora_path.is_file()


from test_flux_files import comfy_tree  # noqa: E402,F401  (the ComfyUI-layout files, fp8 transformer included)
from test_speed_options import fresh_accelerate_state  # noqa: E402,F401  (bf16 runs reset accelerate's state)


# ------------------------------------------------------------------------------------------------ the estimate

GiB = 2**30


@pytest.fixture
def card_12gb(monkeypatch):
    """Pretend a 12 GB NVIDIA card is present (only its properties are read, nothing runs on it)."""
    from types import SimpleNamespace

    props = SimpleNamespace(name="NVIDIA Test 12GB", total_memory=12 * GiB, major=8, minor=6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


def _family_job(family: str, **training):
    """A 1024 px job with the family's own preset (Flux: fp8 and checkpointing on), on the bundled full-size config."""
    from studio.engine.config import Job
    from studio.engine.families import get_family

    job = Job()
    job.model.path, job.model.family = "/nowhere/model.safetensors", family
    for dotted, value in get_family(family).job_defaults().items():
        section, name = dotted.split(".")
        setattr(getattr(job, section), name, value)
    job.training.base_weights_fp8, job.training.gradient_checkpointing = True, True
    job.dataset.resolution, job.sampling.every = 1024, 0
    for name, value in training.items():
        setattr(job.training, name, value)
    return job


@pytest.mark.parametrize("family, swap", [("flux-dev", 36), ("sd3.5-large", 20)])
def test_the_estimate_shows_a_12gb_card_fits_fp8_and_block_swap_at_1024(card_12gb, family, swap):
    from studio.engine.estimate import estimate

    fits = estimate(_family_job(family, block_swap=swap), device="cuda", calibrate=False)
    print(f"{family} 1024 px, fp8 + {swap} blocks swapped, previews off: {fits.summary}")
    assert fits.gpu_memory_bytes < 0.9 * 12 * GiB and fits.warnings == []
    # Loading now needs the text encoders and the VAE only (T5 in fp8 too): the denoiser comes after them.
    assert fits.memory.loading < 0.8 * 12 * GiB
    no_swap = estimate(_family_job(family, block_swap=0), device="cuda", calibrate=False)
    assert no_swap.memory.loading == fits.memory.loading and no_swap.memory.training > fits.memory.training
    bf16 = estimate(_family_job(family, base_weights_fp8=False, block_swap=swap), device="cuda", calibrate=False)
    assert bf16.memory.loading > fits.memory.loading and bf16.memory.training > fits.memory.training
    assert any("training.base_weights_fp8" in w for w in bf16.warnings) or bf16.gpu_memory_bytes < 0.9 * 12 * GiB
    # Previews use the prompts encoded at set-up: the text encoders stay off the GPU, and previews fit too. With the
    # captions encoded every step (shuffled tags) the encoders stay on the GPU throughout, and the estimate says so.
    job = _family_job(family, block_swap=swap)
    job.sampling.every = 100
    previews = estimate(job, device="cuda", calibrate=False)
    print(f"... with previews every 100 steps: {previews.summary}")
    assert previews.memory.training == fits.memory.training and previews.memory.previews <= fits.memory.training
    assert previews.warnings == []
    job.dataset.shuffle_tags = True
    uncached = estimate(job, device="cuda", calibrate=False)
    print(f"... with tags shuffled (no text cache): {uncached.summary}")
    assert uncached.memory.training > 12 * GiB and any("not fit" in w for w in uncached.warnings)


def test_fp8_t5_is_stored_before_it_moves_and_keys_its_own_text_cache(tiny_model):
    """With base_weights_fp8 a run's load stores T5 in fp8 on the host (the embeddings it caches then differ a
    little, so they are cached under their own key); without, nothing changes."""
    from studio.engine.checkpoint import load_model

    folder = str(tiny_model("flux-dev", "flow"))
    plain = load_model(ModelSection(path=folder), dtype=torch.bfloat16, training=TrainingSection())
    fp8 = load_model(ModelSection(path=folder), dtype=torch.bfloat16, training=TrainingSection(base_weights_fp8=True))
    t5 = dict(fp8.text_encoders[1].named_parameters())
    assert "text_storage" not in plain.extra and fp8.extra["text_storage"] == "t5-fp8"
    assert all(p.dtype == torch.bfloat16 for p in plain.text_encoders[1].parameters())
    kept = {n for n in t5 if n.endswith((".wo.weight", "layer_norm.weight")) or n == "shared.weight"}
    assert {n for n, p in t5.items() if p.dtype != FP8} == kept and fp8.text_encoders[1].dtype == torch.bfloat16
    with torch.no_grad():
        a, b = (m.family.encode_text(m, ["a red circle"]) for m in (plain, fp8))
    assert torch.equal(a["pooled"], b["pooled"])  # CLIP untouched
    rel = float((a["t5"].float() - b["t5"].float()).abs().max() / a["t5"].float().abs().max())
    print(f"tiny T5 with fp8 weights: largest change {rel:.1%} of the largest state")
    assert 0 < rel < 0.1


def test_dora_over_fp8_weights_is_refused_before_the_run(tiny_model, tiny_dataset, tmp_path):
    """peft's DoRA reads the frozen weight itself, outside the casting hook: the step would fail (fp8 + fp32)."""
    from studio.engine.config import errors, validate

    job = _fp8_job("flux-dev", tiny_model, tiny_dataset, tmp_path)
    job.lora.dora = True
    [problem] = [p for p in errors(validate(job)) if p.field == "lora.dora"]
    assert "base_weights_fp8" in problem.message
    job.training.base_weights_fp8 = False
    assert not [p for p in errors(validate(job)) if p.field == "lora.dora"]


@pytest.mark.parametrize("family", FAMILIES)
def test_previews_from_prompts_encoded_at_setup_need_no_text_encoder(family, tiny_model, monkeypatch):
    """The run encodes its preview prompts beside the captions (T5-XXL then leaves the GPU for good): previews from
    those embeddings equal the pipeline's own encoding, and no text encoder runs for them."""
    import numpy as np

    from studio.engine.checkpoint import load_model
    from studio.engine.sampling import cache_preview_embeds, preview_embeds_cached, render_many

    bundle = load_model(ModelSection(path=str(tiny_model(family, "flow"))))
    prompts, settings = ["a red circle", "a blue square"], {"seeds": [1, 2], "steps": 2, "width": 64, "height": 64}
    if hasattr(bundle.family, "t5_max_length"):  # the tiny T5 tokenizer stops at 32 tokens; FluxPipeline pads to 512
        monkeypatch.setattr(bundle.family, "t5_length", bundle.family.t5_max_length(bundle))
    own = [np.asarray(im, dtype=np.int16) for im in render_many(bundle, prompts, **settings)]
    assert cache_preview_embeds(bundle, prompts, "") and preview_embeds_cached(bundle, prompts, "")
    assert not preview_embeds_cached(bundle, prompts, "blurry")  # another negative prompt: encoded again
    def gone(*args, **kwargs):
        raise AssertionError("a preview ran a text encoder")

    for encoder in bundle.text_encoders:
        encoder.forward = gone
    cached = [np.asarray(im, dtype=np.int16) for im in render_many(bundle, prompts, **settings)]
    worst = max(int(np.abs(a - b).max()) for a, b in zip(own, cached))
    print(f"{family}: previews from prompts encoded at set-up differ from the pipeline's own by at most {worst}/255")
    assert worst <= 2
