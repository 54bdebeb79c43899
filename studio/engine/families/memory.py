"""Fitting a big transformer on a consumer GPU: frozen weights stored in fp8, and block swap (blocks in CPU memory).

fp8 storage is diffusers' layerwise casting (``ModelMixin.enable_layerwise_casting``): every frozen Linear keeps its
weight in ``float8_e4m3fn`` and is cast to the compute dtype just for its forward; diffusers skips peft's adapter
layers itself, so the trainable LoRA stays fp32. Chosen over torchao/optimum-quanto because it is already a
dependency, needs no fp8 matmul kernel (works on any GPU and on the CPU) and leaves peft's wrapping untouched.

Block swap is a small hook here, not diffusers' group offloading: group offloading swaps every parameter,
trainable ones included (their gradients would land on the wrong device), and has no notion of backward. Here only
the frozen parameters of the last N blocks move: to the GPU in the block's forward pre-hook, back to the CPU
after its forward. With gradient checkpointing (diffusers checkpoints each block) backward recomputes the block
through the same hooks, so the weights are on the GPU exactly while a block runs.

The order at load is what makes a 12 GB card enough: the run loads the denoiser into host memory, adds the LoRA
there, casts the frozen weights to fp8 there, and only then moves it to the device tensor by tensor (``place``),
leaving the frozen weights of swapped blocks on the host. Casting after the move (as first written) put the whole
bf16 transformer on the device first (FLUX.1: 23.8 GB) and failed before training started. The LoRA is added
before the cast so peft creates it from bf16 weights exactly as before (peft gives adapters the base weight's
dtype, and DoRA's norm of an fp8 weight has no CPU kernel); the result equals casting after the move, bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def store_frozen_in_fp8(denoiser: Any, compute_dtype: torch.dtype) -> None:
    """Keep the denoiser's frozen Linear/Conv weights in float8_e4m3fn; compute in ``compute_dtype``."""
    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


# T5-XXL's encoder (google/t5-v1_1-xxl): 4,762 M parameters. Two parts stay in the load dtype: the 24 feed-forward
# output projections ``wo`` (4096 x 10240 each), because transformers' T5 casts the hidden states to
# ``wo.weight.dtype`` before calling ``wo`` (T5DenseGatedActDense.forward), i.e. to fp8 before the casting hook runs;
# and the token embedding (32128 x 4096), because ``PreTrainedModel.dtype`` is its first parameter's dtype and
# pipelines make their latents in the text encoder's dtype (fp8 would fail there).
T5_XXL_PARAMETERS = 4762.3e6
T5_XXL_KEPT_PARAMETERS = 24 * 4096 * 10240 + 32128 * 4096
_T5_KEEP = (r"\.wo$", r"^shared$", r"embed_tokens$")


def store_t5_in_fp8(encoder: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep a frozen T5 encoder's Linear and embedding weights in float8_e4m3fn (``wo`` excepted), computing in
    ``compute_dtype``: what kohya's ``--fp8_base`` does for T5-XXL, so loading (the text encoders and the VAE
    caching captions) fits a 12 GB card too. Its outputs move by fp8's rounding (3 mantissa bits per weight)."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    apply_layerwise_casting(encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + _T5_KEEP)
    if encoder.dtype != compute_dtype:  # a transformers change in parameter order would make previews fail later
        raise RuntimeError(f"T5 reports {encoder.dtype} after fp8 storage (expected {compute_dtype}); its first "
                           "parameter is no longer the token embedding")


def t5_bytes(fp8: bool, weight_bytes: int) -> float:
    """Bytes of T5-XXL's weights as the job stores them (``store_t5_in_fp8`` or the load dtype)."""
    if not fp8:
        return T5_XXL_PARAMETERS * weight_bytes
    return (T5_XXL_PARAMETERS - T5_XXL_KEPT_PARAMETERS) + T5_XXL_KEPT_PARAMETERS * weight_bytes


def place(denoiser: torch.nn.Module, device: torch.device | str, host_blocks: list[torch.nn.Module] = ()) -> int:
    """Move the denoiser to ``device`` one tensor at a time, as stored (fp8 weights move as fp8), except the frozen
    parameters of ``host_blocks`` (swapped blocks: they stay on the host until their block runs). Trainable
    parameters always move. Returns the bytes of frozen weights moved (for the log and the tests)."""
    device = torch.device(device)
    stay = {id(p) for block in host_blocks for p in block.parameters() if not p.requires_grad}
    moved = 0
    for module in denoiser.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in stay:
                p.data = p.data.to(device)
                moved += 0 if p.requires_grad else p.numel() * p.element_size()
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return moved


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters occupy (as stored)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class BlockSwap:
    """The frozen weights of ``blocks`` live on ``offload``; each block's are on ``onload`` only while it runs."""

    def __init__(self, blocks: list[torch.nn.Module], onload: torch.device | str, offload: torch.device | str = "cpu"):
        self.onload, self.offload = torch.device(onload), torch.device(offload)
        self.blocks = list(blocks)
        self.transfers = 0
        self._handles: list[Any] = []
        for block in self.blocks:
            self._move(block, self.offload)
            # A LoRA added while the block was on the host (the run places the denoiser after adding it) belongs on
            # the compute device with its gradients and optimizer state.
            for p in block.parameters():
                if p.requires_grad and p.device != self.onload:
                    p.data = p.data.to(self.onload)
            self._handles.append(block.register_forward_pre_hook(lambda m, args: self._move(m, self.onload)))
            self._handles.append(block.register_forward_hook(lambda m, args, out: self._move(m, self.offload)))

    def _move(self, block: torch.nn.Module, device: torch.device) -> None:
        # Trainable (LoRA) parameters stay put: their gradients and optimizer state belong on the compute device.
        for p in block.parameters():
            if not p.requires_grad and p.device != device:
                p.data = p.data.to(device, non_blocking=device.type != "cpu")
        self.transfers += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for block in self.blocks:
            self._move(block, self.onload)
        self._handles.clear()


def place_swapping(bundle: Any, blocks: list[torch.nn.Module], count: int, device: torch.device | str) -> int:
    """A big denoiser onto the device: the last ``count`` of ``blocks`` swapped (their frozen weights stay on the
    host; the swap hooks go into ``bundle.extra['block_swap']``), everything else moved tensor by tensor, as stored.
    Returns the bytes of frozen weights now on the device."""
    swap = swap_blocks(blocks, count, device)
    moved = place(bundle.denoiser, device, swap.blocks if swap else [])
    if swap is not None:
        bundle.extra["block_swap"] = swap
    from studio.engine.devices import format_bytes

    log.info("denoiser on %s: %s of frozen weights (%d blocks swapped from the host)", device, format_bytes(moved),
             len(swap.blocks) if swap else 0)
    return moved


def swap_blocks(blocks: list[torch.nn.Module], count: int, onload: torch.device | str) -> BlockSwap | None:
    """Swap the last ``count`` blocks (0: none); the first ones stay resident, as kohya's blocks_to_swap does."""
    if count <= 0:
        return None
    count = min(count, len(blocks))
    return BlockSwap(blocks[len(blocks) - count:], onload)
