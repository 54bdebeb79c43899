"""Fitting Flux on consumer GPUs, checked on the CPU: fp8 storage bytes, block swap equal to no swap, the estimate."""

from __future__ import annotations

import copy

import pytest
import torch

from studio.engine.config import Job, LoraSection, ModelSection, TrainingSection
from studio.engine.families import memory


@pytest.fixture(scope="module")
def bundle(tiny_model):
    from studio.engine.checkpoint import load_model
    from studio.engine.lora import inject_lora

    b = load_model(ModelSection(path=str(tiny_model("flux-dev", "flow"))))
    torch.manual_seed(0)
    params = inject_lora(b, LoraSection(rank=4, alpha=4.0), train_text_encoder=False)
    with torch.no_grad():
        for p in params["transformer"]:
            p.add_(torch.randn(p.shape) * 0.1)
    return b


def _inputs(b):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=gen) * 0.2
    with torch.no_grad():
        cond = b.family.encode_text(b, ["a red circle", "a blue square"])
    return latents, cond


def _loss_and_grads(b, denoiser, latents, cond):
    denoiser.zero_grad(set_to_none=True)
    loss = b.family.training_loss(b, denoiser, latents, cond, training=TrainingSection(),
                                  generator=torch.Generator().manual_seed(11), weight_dtype=torch.float32)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fp8_storage_halves_the_frozen_weights_and_still_trains(bundle):
    latents, cond = _inputs(bundle)
    plain = copy.deepcopy(bundle.denoiser).to(torch.bfloat16)
    fp8 = copy.deepcopy(plain)
    before = memory.parameter_bytes(plain)
    memory.store_frozen_in_fp8(fp8, torch.bfloat16)
    after = memory.parameter_bytes(fp8)
    print(f"tiny Flux transformer parameters: bf16 {before} B, fp8 storage {after} B")
    # Every weight stored in fp8 saved one byte; diffusers keeps norms/embeddings (a few %) in bf16.
    fp8_count = sum(p.numel() for p in fp8.parameters() if p.dtype == torch.float8_e4m3fn)
    assert before - after == fp8_count and after < 0.7 * before
    assert all(p.dtype == torch.bfloat16 for n, p in fp8.named_parameters() if p.requires_grad)
    from studio.engine.lora import lora_layers

    layer = lora_layers(fp8)["transformer_blocks.0.attn.to_q"]
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fp8, grads = _loss_and_grads(bundle, fp8, latents.bfloat16(), cond.to("cpu", torch.bfloat16))
        loss_bf16, _ = _loss_and_grads(bundle, plain, latents.bfloat16(), cond.to("cpu", torch.bfloat16))
    assert torch.isfinite(loss_fp8) and abs(float(loss_fp8) - float(loss_bf16)) < 0.05 * float(loss_bf16)
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_gives_the_same_outputs_and_gradients(bundle, checkpointing):
    latents, cond = _inputs(bundle)
    reference = copy.deepcopy(bundle.denoiser)
    swapped = copy.deepcopy(bundle.denoiser)
    if checkpointing:
        reference.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing()
    blocks = [*swapped.transformer_blocks, *swapped.single_transformer_blocks]
    swap = memory.swap_blocks(blocks, 2, "cpu")
    loss_ref, grads_ref = _loss_and_grads(bundle, reference, latents, cond)
    loss_swap, grads_swap = _loss_and_grads(bundle, swapped, latents, cond)
    assert torch.equal(loss_ref, loss_swap)
    assert grads_ref.keys() == grads_swap.keys() and all(torch.equal(grads_ref[k], grads_swap[k]) for k in grads_ref)
    # Two blocks, in and out per forward; checkpointed backward recomputes through the same hooks (moves again).
    assert swap.blocks == blocks[1:]
    assert swap.transfers > 2 + 2 * 2 if checkpointing else swap.transfers == 2 + 2 * 2
    trainable = {id(p) for p in swapped.parameters() if p.requires_grad}
    assert trainable and all(p.device.type == "cpu" for b in swap.blocks for p in b.parameters() if id(p) not in trainable)
    print(f"block swap ({'with' if checkpointing else 'without'} checkpointing): loss {float(loss_swap):.6f} equal, "
          f"{len(grads_swap)} LoRA gradients equal, {swap.transfers} block moves")


def test_the_estimate_counts_fp8_and_block_swap():
    from studio.engine.estimate import memory_phases

    def gpu_memory(job, family, lora_params):  # the training phase: the denoiser's weights beside the LoRA's
        return memory_phases(job, family, lora_params).training

    job = Job()
    job.model.family = "flux-dev"
    job.dataset.resolution = 1024
    job.training.gradient_checkpointing = True
    job.training.mixed_precision = "bf16"
    base = gpu_memory(job, "flux-dev", 20_000_000)
    job.training.base_weights_fp8 = True
    fp8 = gpu_memory(job, "flux-dev", 20_000_000)
    job.training.block_swap = 20
    swapped = gpu_memory(job, "flux-dev", 20_000_000)
    gib = 2**30
    print(f"Flux dev 1024 px rank-16-ish estimate: bf16 {base / gib:.1f} GiB, fp8 {fp8 / gib:.1f} GiB, "
          f"fp8 + 20 blocks swapped {swapped / gib:.1f} GiB")
    # fp8 saves one byte per transformer weight (11.9 GB); 19 more blocks off the GPU save ~1 byte x 19/57 x 96 %.
    assert 10.5 * gib < base - fp8 < 12.5 * gib
    assert 3.0 * gib < fp8 - swapped < 4.5 * gib
