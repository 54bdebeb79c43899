"""The shared rectified-flow pieces: σ densities, shifts equal to diffusers' scheduler, noising, weights, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from studio.engine import config
from studio.engine.families import flow


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_logit_normal_sigmas_have_the_asked_statistics():
    # logit(σ) of the unshifted draw is normal with the asked mean/std; a density bug (e.g. uniform) fails this.
    s = flow.sample_sigmas(20000, flow.FlowSampling(density="logit_normal", logit_mean=0.7, logit_std=0.5), _gen())
    z = torch.logit(s.double())
    assert abs(z.mean().item() - 0.7) < 0.02
    assert abs(z.std().item() - 0.5) < 0.02
    uniform = flow.sample_sigmas(20000, flow.FlowSampling(density="uniform"), _gen())
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.std().item() - 1 / math.sqrt(12)) < 0.01
    assert float(s.min()) >= flow.SIGMA_MIN and float(s.max()) <= 1.0


def test_mode_density_moves_mass_with_its_scale():
    low = flow.sample_sigmas(20000, flow.FlowSampling(density="mode", mode_scale=-0.5), _gen())
    high = flow.sample_sigmas(20000, flow.FlowSampling(density="mode", mode_scale=1.29), _gen())
    # The SD3 paper's mode density: a positive scale concentrates σ around the middle, a negative one at the ends.
    assert ((high - 0.5).abs().mean() < (low - 0.5).abs().mean())


def test_constant_shift_equals_the_schedulers_shifted_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    torch.testing.assert_close(flow.constant_shift(plain, 3.0), shifted)
    assert torch.all(flow.constant_shift(plain, 3.0) >= plain)


def test_resolution_shift_equals_flux_dynamic_shifting_and_grows_with_size():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    grid = torch.linspace(1.0, 1 / 28, 28)
    mu = flow.flux_mu(64 * 64)  # a 1024 px image: 64 x 64 packed tokens
    assert mu == pytest.approx(1.15)
    sched.set_timesteps(sigmas=grid.numpy(), mu=mu)
    torch.testing.assert_close(flow.resolution_shift(grid, mu), sched.sigmas[:-1].float())
    # Monotonic in σ, and a bigger image is pushed further to the noisy end.
    shifted = flow.resolution_shift(grid, mu)
    assert torch.all(shifted[:-1] > shifted[1:])
    assert torch.all(flow.resolution_shift(grid, flow.flux_mu(32 * 32)) <= shifted)


def test_resolution_shift_needs_the_token_count():
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.sample_sigmas(2, flow.FlowSampling(shift="resolution"), _gen())


def test_noising_target_and_weights():
    x, eps = torch.full((2, 3, 4, 4), 2.0), torch.full((2, 3, 4, 4), -1.0)
    s = torch.tensor([0.0, 0.25])
    noisy = flow.noisy_latents(x, eps, s)
    assert torch.equal(noisy[0], x[0]) and torch.allclose(noisy[1], torch.full((3, 4, 4), 0.75 * 2 - 0.25))
    # The target is the velocity: the σ-derivative of the path is constant along it.
    torch.testing.assert_close(flow.noisy_latents(x, eps, s + 0.5) - noisy, 0.5 * flow.velocity_target(x, eps))
    torch.testing.assert_close(flow.loss_weights("sigma_sqrt", torch.tensor([0.5])), torch.tensor([4.0]))
    assert torch.equal(flow.loss_weights("none", s), torch.ones(2))
    cos = flow.loss_weights("cosmap", torch.linspace(0.01, 0.99, 99))
    assert int(cos.argmax()) == 49  # cosmap peaks at σ = 1/2
    with pytest.raises(ValueError, match="weighting"):
        flow.loss_weights("snr", s)


def test_a_draw_is_a_pure_function_of_the_seed():
    latents = torch.randn(3, 4, 8, 8)
    sampling = flow.FlowSampling(shift="resolution", weighting="cosmap")
    a, b = (flow.draw(latents, sampling, _gen(7), image_seq_len=16) for _ in range(2))
    c = flow.draw(latents, sampling, _gen(8), image_seq_len=16)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.sigmas, b.sigmas) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.sigmas, c.sigmas)
    torch.manual_seed(0)  # the global generator plays no part
    d = flow.draw(latents, sampling, _gen(7), image_seq_len=16)
    assert torch.equal(a.noisy, d.noisy)


def test_job_options_are_declared_validated_and_resolved():
    job = config.Job()
    info = config.field_info("training.flow_timestep_sampling")
    assert info.choices == flow.DENSITIES and config.field_info("training.flow_shift").choices == flow.SHIFTS
    assert config.field_info("training.flow_loss_weighting").choices == flow.WEIGHTINGS
    job.training.flow_shift, job.training.flow_logit_std = "sideways", 0.0
    problems = {p.field for p in config.validate(job, check_paths=False)}
    assert {"training.flow_shift", "training.flow_logit_std"} <= problems
    job.training.flow_shift = "auto"
    assert flow.FlowSampling.from_training(job.training, "resolution").shift == "resolution"
    job.training.flow_shift = "constant"
    assert flow.FlowSampling.from_training(job.training, "resolution").shift == "constant"
