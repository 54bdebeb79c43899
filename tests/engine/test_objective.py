"""The SD/SDXL training objective checked against diffusers' own definitions, not against our formula.

The real tiny UNet runs; a forward hook records what it was given (noisy latents, timesteps, time ids) and what it
predicted. From those, the test rebuilds the noise with diffusers' ``DDPMScheduler.add_noise`` (it is linear in
the noise), the target with ``add_noise``'s identity or ``get_velocity``, and the min-SNR weight from
``diffusers.training_utils.compute_snr`` with the paper's min(SNR, γ) / SNR (or / (SNR + 1) for v), and compares
the loss the family returned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from PIL import Image

from studio.engine.buckets import prepare_image
from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection, TrainingSection


def _bundle(folder):
    return load_model(ModelSection(path=str(folder)))


def _run_objective(bundle, *, batch: int = 4, hw: tuple[int, int] = (8, 8), seed: int = 0, cond=None, **training):
    """The family's loss and what its UNet saw: (loss, latents, noisy, timesteps, prediction, kwargs)."""
    torch.manual_seed(100 + seed)
    latents = torch.randn(batch, 4, *hw)
    if cond is None:
        with torch.no_grad():
            cond = bundle.family.encode_text(bundle, ["a red circle"] * batch)
        cond = cond.with_tensors(**bundle.family.example_conditioning(
            [{"original_hw": torch.tensor((64, 64)), "crop_tl": torch.tensor((0, 0))}] * batch, (64, 64)))
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(noisy=args[0].detach().clone(), t=args[1].detach().clone(), pred=output.sample.detach().clone(),
                    kwargs=kwargs)

    hook = bundle.denoiser.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            loss = bundle.family.training_loss(bundle, bundle.denoiser, latents, cond,
                                               training=TrainingSection(**training),
                                               generator=torch.Generator().manual_seed(seed), weight_dtype=torch.float32)
    finally:
        hook.remove()
    return loss, latents, seen["noisy"], seen["t"], seen["pred"], seen["kwargs"]


def _noise_of(sched, latents, noisy, t):
    """The noise that produced ``noisy``: add_noise(x, ε, t) = add_noise(x, 0, t) + add_noise(0, ε, t), and
    add_noise(0, ε, t) is ε scaled per sample by add_noise(0, 1, t)."""
    zeros, ones = torch.zeros_like(latents), torch.ones_like(latents)
    return (noisy - sched.add_noise(latents, zeros, t)) / sched.add_noise(zeros, ones, t)


def _paper_weight(sched, t, gamma, v_prediction):
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for ε, / (SNR + 1) for v; at SNR = 0 the ε weight is its
    limit, 1 (what diffusers' training scripts substitute for zero-terminal-SNR schedules)."""
    snr = compute_snr(sched, t)
    weight = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if v_prediction else snr)
    if not v_prediction:
        weight = torch.where(snr == 0, torch.ones_like(weight), weight)
    return weight


@pytest.mark.parametrize("gamma", [0.0, 5.0])
@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2v"])
def test_loss_matches_diffusers_definition(fixture, gamma, request):
    bundle = _bundle(request.getfixturevalue(fixture))
    sched = bundle.noise_scheduler
    v_prediction = bundle.prediction_type == "v_prediction"
    assert v_prediction == (fixture == "tiny_sd2v")
    loss, latents, noisy, t, pred, _ = _run_objective(bundle, min_snr_gamma=gamma)
    assert t.dtype == torch.long and ((t >= 0) & (t < sched.config.num_train_timesteps)).all()
    noise = _noise_of(sched, latents, noisy, t)
    assert torch.allclose(sched.add_noise(latents, noise, t), noisy, atol=1e-5)
    assert abs(noise.std().item() - 1) < 0.15 and abs(noise.mean().item()) < 0.15, "the noise is N(0, 1)"
    target = sched.get_velocity(latents, noise, t) if v_prediction else noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if gamma:
        per_sample = per_sample * _paper_weight(sched, t, gamma, v_prediction)
    assert torch.allclose(loss, per_sample.mean(), rtol=1e-4), (loss, per_sample.mean())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_is_finite_where_the_schedule_reaches_zero_snr(tiny_sd1, prediction):
    """A zero-terminal-SNR schedule (ztsnr models) has SNR 0 at the last timestep; min(SNR, γ) / SNR was 0/0 there
    with ε-prediction, so one such timestep made the whole loss NaN. Ten timesteps: the batch surely draws the last."""
    bundle = _bundle(tiny_sd1)
    sched = bundle.noise_scheduler = DDPMScheduler(num_train_timesteps=10, beta_schedule="scaled_linear",
                                                   rescale_betas_zero_snr=True, prediction_type=prediction)
    bundle.prediction_type = prediction
    loss, latents, noisy, t, pred, _ = _run_objective(bundle, batch=32, hw=(4, 4), min_snr_gamma=5.0)
    assert (t == 9).any() and (compute_snr(sched, t) == 0).any(), "the zero-SNR timestep was drawn"
    assert torch.isfinite(loss)
    noise = _noise_of(sched, latents, noisy, t)
    target = sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    expected = (per_sample * _paper_weight(sched, t, 5.0, prediction == "v_prediction")).mean()
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_noise_offset_shifts_each_channel_by_a_constant(tiny_sd1):
    """Noise offset (Guttenberg 2023) adds offset · N(0, 1) per sample and channel, constant over the image: the
    spatial means of the noise spread by about the offset instead of 1/√(pixels)."""
    bundle = _bundle(tiny_sd1)
    spreads = {}
    for offset in (0.0, 0.5):
        _, latents, noisy, t, _, _ = _run_objective(bundle, batch=8, hw=(16, 16), noise_offset=offset)
        noise = _noise_of(bundle.noise_scheduler, latents, noisy, t)
        spreads[offset] = noise.mean(dim=(2, 3)).std().item()
    assert spreads[0.0] < 0.15, spreads
    assert 0.3 < spreads[0.5] < 0.75, spreads


def test_sdxl_time_ids_reach_the_unet_in_diffusers_order(tiny_sdxl):
    """A 300×200 (w×h) image in a 64×48 bucket: resized to 72×48, cropped 4 px from the left. The UNet must get
    exactly what StableDiffusionXLPipeline builds: (original h, w, crop top, left, target h, w)."""
    bundle = _bundle(tiny_sdxl)
    image = Image.new("RGB", (300, 200), (128, 64, 32))
    _, crop_tl, original_hw = prepare_image(image, (64, 48))
    entry = {"original_hw": torch.tensor(original_hw), "crop_tl": torch.tensor(crop_tl)}
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, ["a red circle"])
    cond = cond.with_tensors(**bundle.family.example_conditioning([entry], (48, 64)))
    _, _, _, _, _, kwargs = _run_objective(bundle, batch=1, hw=(6, 8), cond=cond)
    expected = bundle.pipeline()._get_add_time_ids((200, 300), (0, 4), (48, 64), torch.float32,
                                                   text_encoder_projection_dim=bundle.text_encoders[1].config.projection_dim)
    assert torch.equal(kwargs["added_cond_kwargs"]["time_ids"], expected), kwargs["added_cond_kwargs"]["time_ids"]
    assert torch.equal(kwargs["added_cond_kwargs"]["text_embeds"], cond["pooled"])
