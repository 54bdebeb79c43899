"""Previews during training: the VAE decodes in fp32 outside autocast, and every module runs in eval mode."""

from __future__ import annotations

import numpy as np
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import LoraSection, ModelSection
from studio.engine.lora import inject_lora
from studio.engine.sampling import render


def test_sdxl_preview_decodes_the_vae_in_fp32_under_autocast(tiny_sdxl):
    """The trainer previews under the training precision's autocast; the fp32 VAE must not run in half precision
    there (fp16 SDXL VAE overflow: the black/NaN preview). bf16 autocast is what the CPU has; fp16 on a GPU takes
    the same path."""
    bundle = load_model(ModelSection(path=str(tiny_sdxl)))
    bundle.vae.to(torch.float32)
    seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def record(module, inputs, output):
        seen.append((inputs[0].dtype, output.dtype, torch.is_autocast_enabled("cpu")))

    hooks = [bundle.vae.decoder.conv_in.register_forward_hook(record),
             bundle.vae.decoder.conv_out.register_forward_hook(record)]
    try:
        image = render(bundle, "a red circle", seed=1, steps=2, width=64, height=64, autocast_dtype=torch.bfloat16)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen, "the VAE decoder did not run"
    assert all(i == torch.float32 and o == torch.float32 and not autocast for i, o, autocast in seen), seen
    assert np.asarray(image).shape == (64, 64, 3)


def test_previews_run_lora_dropout_in_eval_mode_and_restore_training(tiny_sd1):
    """With the text encoder training and lora.dropout > 0, a preview must not drop anything (same seed, same
    image) and the modules must be back in train mode afterwards."""
    bundle = load_model(ModelSection(path=str(tiny_sd1)))
    torch.manual_seed(0)
    inject_lora(bundle, LoraSection(rank=4, alpha=4.0, dropout=0.5, train_text_encoder=True), train_text_encoder=True)
    for module in bundle.components().values():
        module.train()
    dropout_modes: list[bool] = []
    drops = [m for te in bundle.text_encoders for m in te.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.5]
    assert drops, "the text encoder has LoRA dropout layers"
    hook = drops[0].register_forward_hook(lambda m, i, o: dropout_modes.append(m.training))
    try:
        first = np.asarray(render(bundle, "a red circle", seed=3, steps=2, width=64, height=64))
        second = np.asarray(render(bundle, "a red circle", seed=3, steps=2, width=64, height=64))
    finally:
        hook.remove()
    assert dropout_modes and not any(dropout_modes), "LoRA dropout was active while previewing"
    assert np.array_equal(first, second)
    assert all(module.training for module in bundle.components().values()), "train mode was not restored"
