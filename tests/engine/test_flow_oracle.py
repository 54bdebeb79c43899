"""An oracle denoiser pins the flow families' conventions to their own diffusers pipelines.

The oracle knows the clean latent ``x`` and reads σ from the timestep the way the pipeline passes it (FluxPipeline
gives the transformer ``t / 1000 = σ``, StableDiffusion3Pipeline gives ``t = σ · 1000``); it answers the exact
velocity ``(x_σ - x) / σ``. Then:

* in training the loss is zero only if training passes σ in the pipeline's convention, noises as ``(1 - σ) x + σ ε``,
  targets ``ε - x`` and packs the target like the input (Flux);
* in the pipeline, whose Euler steps read the prediction as d x_σ / dσ, the oracle lands exactly on ``x``, and the
  decoded image is the VAE's decoding of the raw (unnormalised) latent: the family's ``encode_image`` normalisation
  is the inverse of the pipeline's ``latents / scaling_factor + shift_factor``.
"""

from __future__ import annotations

import pytest
import torch

from studio.engine.checkpoint import load_model
from studio.engine.config import ModelSection, TrainingSection


def _pixels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


def _flux_oracle(x_packed: torch.Tensor, seen: list):
    def forward(hidden_states, timestep, guidance=None, **kwargs):
        seen.append({"timestep": timestep.detach().clone(),
                     "guidance": None if guidance is None else guidance.detach().clone()})
        sigma = timestep.float().reshape(-1, 1, 1)  # FluxPipeline: timestep / 1000, i.e. σ
        return ((hidden_states.float() - x_packed) / sigma,)
    return forward


def _sd3_oracle(x: torch.Tensor, seen: list):
    def forward(hidden_states, timestep, **kwargs):
        seen.append({"timestep": timestep.detach().clone()})
        sigma = (timestep.float() / 1000).reshape(-1, 1, 1, 1)  # StableDiffusion3Pipeline: scheduler t = σ · 1000
        return ((hidden_states.float() - x) / sigma,)
    return forward


def _decoded(bundle, raw_latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = bundle.vae.decode(raw_latent).sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_training_and_sampling_agree_with_an_exact_velocity(tiny_model, name):
    from diffusers import FluxPipeline

    bundle = load_model(ModelSection(path=str(tiny_model(name, "flow"))))
    family = bundle.family
    pixels = _pixels()
    with torch.no_grad():
        x, _ = family.encode_image(bundle, pixels)
        cond = family.encode_text(bundle, ["a red circle", ""])
        raw = bundle.vae.encode(pixels).latent_dist.mean
    b, c, h, w = x.shape
    x_packed = FluxPipeline._pack_latents(x, b, c, h, w)
    seen: list = []
    bundle.denoiser.forward = _flux_oracle(x_packed, seen)

    training = TrainingSection(guidance=2.5)
    for density in ("logit_normal", "uniform", "mode"):
        training.flow_timestep_sampling = density
        with torch.no_grad():
            loss = family.training_loss(bundle, bundle.denoiser, x, cond.index(slice(0, 1)), training=training,
                                        generator=torch.Generator().manual_seed(3), weight_dtype=torch.float32)
        assert float(loss) < 1e-8, (density, float(loss))
    sigma = float(seen[-1]["timestep"][0])
    assert 0 < sigma <= 1, "Flux's transformer takes σ in (0, 1] (it multiplies by 1000 itself)"
    if bundle.denoiser.config.guidance_embeds:
        assert float(seen[-1]["guidance"][0]) == 2.5  # the raw value, as the pipeline passes guidance_scale
    else:
        assert seen[-1]["guidance"] is None

    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = family.pipeline_kwargs(negative_prompt="", guidance=2.5, lora_scale=None)
    kwargs["max_sequence_length"] = min(kwargs["max_sequence_length"], family.t5_max_length(bundle))
    seen.clear()
    for steps in (1, 3):
        out = pipe("a red circle", num_inference_steps=steps, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(1), **kwargs).images
        torch.testing.assert_close(out.float(), x_packed, atol=1e-5, rtol=1e-5)
    if bundle.denoiser.config.guidance_embeds:
        assert float(seen[0]["guidance"][0]) == 2.5
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(image.float(), _decoded(bundle, raw), atol=1e-4, rtol=1e-4)


def test_sd3_training_and_sampling_agree_with_an_exact_velocity(tiny_model):
    bundle = load_model(ModelSection(path=str(tiny_model("sd3.5-medium", "flow"))))
    family = bundle.family
    pixels = _pixels(1)
    with torch.no_grad():
        x, _ = family.encode_image(bundle, pixels)
        cond = family.encode_text(bundle, ["a red circle"])
        raw = bundle.vae.encode(pixels).latent_dist.mean
    seen: list = []
    bundle.denoiser.forward = _sd3_oracle(x, seen)

    training = TrainingSection()
    for density in ("logit_normal", "uniform", "mode"):
        training.flow_timestep_sampling = density
        with torch.no_grad():
            loss = family.training_loss(bundle, bundle.denoiser, x, cond, training=training,
                                        generator=torch.Generator().manual_seed(3), weight_dtype=torch.float32)
        assert float(loss) < 1e-8, (density, float(loss))
    assert 1 < float(seen[-1]["timestep"][0]) <= 1000, "SD3's transformer takes σ · 1000"

    pipe = bundle.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = family.pipeline_kwargs(negative_prompt="", guidance=4.5, lora_scale=None)
    for steps in (1, 3):
        out = pipe("a red circle", num_inference_steps=steps, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(1), **kwargs).images
        torch.testing.assert_close(out.float(), x, atol=1e-5, rtol=1e-5)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(image.float(), _decoded(bundle, raw), atol=1e-4, rtol=1e-4)


def _seen_sigmas(bundle, latents, cond, training, seed=3) -> torch.Tensor:
    """σ the SD3 transformer is given in one training step (it takes σ · 1000)."""
    seen: list = []
    bundle.denoiser.forward = _sd3_oracle(latents, seen)
    with torch.no_grad():
        bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=training,
                                    generator=torch.Generator().manual_seed(seed), weight_dtype=torch.float32)
    return seen[-1]["timestep"].float() / 1000


def test_sd3_shifts_follow_the_model_s_scheduler_and_the_resolution_shift_works(tiny_model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from studio.engine.families import flow

    bundle = load_model(ModelSection(path=str(tiny_model("sd3.5-medium", "flow"))))
    latents = torch.zeros(4, 16, 32, 32)
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, ["a red circle"] * 4)

    def expected(sampling, **kwargs):
        return flow.draw(latents, sampling, torch.Generator().manual_seed(3), **kwargs).sigmas

    # 'resolution' on SD3 (as StableDiffusion3Pipeline's dynamic shifting): the token count is the patched latent's.
    training = TrainingSection(flow_shift="resolution")
    tokens = (32 // 2) * (32 // 2)
    torch.testing.assert_close(_seen_sigmas(bundle, latents, cond, training),
                               expected(flow.FlowSampling(shift="resolution"), image_seq_len=tokens))
    # 'auto' takes the model's own constant shift (its scheduler's), as the previews sample with it.
    bundle.noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    torch.testing.assert_close(_seen_sigmas(bundle, latents, cond, TrainingSection()),
                               expected(flow.FlowSampling(shift="constant", shift_value=2.0)))
    # … and a scheduler that shifts by resolution makes 'auto' do the same.
    bundle.noise_scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    torch.testing.assert_close(_seen_sigmas(bundle, latents, cond, TrainingSection()),
                               expected(flow.FlowSampling(shift="resolution"), image_seq_len=tokens))


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium", "zimage", "qwen-image"])
def test_a_latent_of_odd_size_trains_on_its_even_part(tiny_model, name):
    """Both transformers work on 2 x 2 latent patches. A bucket or resolution that is a multiple of 8 but not of 16
    (e.g. 1000 px: a 125-row latent) used to fail inside the step (Flux's packing, SD3's patch embedding); the
    step uses the even part, as the pipelines round such sizes down."""
    bundle = load_model(ModelSection(path=str(tiny_model(name, "flow"))))
    c = bundle.denoiser.config.in_channels // (4 if name.startswith(("flux", "qwen")) else 1)  # packed 2 x 2
    odd = torch.randn(1, c, 9, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = bundle.family.encode_text(bundle, ["a red circle"])

    def loss(latents):
        with torch.no_grad():
            return float(bundle.family.training_loss(bundle, bundle.denoiser, latents, cond, training=TrainingSection(),
                                                     generator=torch.Generator().manual_seed(5),
                                                     weight_dtype=torch.float32))
    assert loss(odd) == loss(odd[..., :8, :10].contiguous())


def test_sd3_previews_of_a_size_its_pipeline_refuses_are_rounded_down(tiny_model):
    """StableDiffusion3Pipeline refuses sizes not divisible by its VAE factor x patch size (16 on the real models;
    4 on the tiny one); previews and Try & Export round them down, as FluxPipeline does itself."""
    from studio.engine.sampling import render

    bundle = load_model(ModelSection(path=str(tiny_model("sd3.5-medium", "flow"))))
    image = render(bundle, "a red circle", steps=1, guidance=1.0, width=70, height=66)
    assert image.size == (68, 64)
