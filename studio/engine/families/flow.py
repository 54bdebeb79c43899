"""Rectified-flow training pieces shared by the flow-matching families (Flux.1, SD3.x): σ sampling, noising, target, weights.

The objective (Liu et al. 2022; Esser et al. 2024, "SD3"): a clean latent ``x`` and noise ``ε`` are mixed as
``x_σ = (1 - σ) x + σ ε``; the network predicts the velocity ``ε - x``. What differs between recipes is how σ
is drawn — a density over ``u`` in (0, 1) (uniform, logit-normal, "mode") then a *shift* that moves mass to
the noisy end (SD3: a constant shift; Flux: a shift ``mu`` growing with the image's token count) — and an
optional per-σ loss weight. Users choose between them with the ``training.flow_*`` options.

The density and the weights are diffusers' own (``diffusers.training_utils.compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``); they take the step's generator, so a step stays a pure function of its
seed. The shifts are written here (four lines) because diffusers keeps them inside
``FlowMatchEulerDiscreteScheduler``, which applies them to an inference timestep grid, not to a batch of drawn
σ; a test checks both give the same σ on the scheduler's grid. Nothing here reads a device value back to the
host: every tensor is drawn on the CPU and moved once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.config import TrainingSection

# The user's choices (config.TrainingSection declares them with these values).
DENSITIES = ("logit_normal", "uniform", "mode")
SHIFTS = ("auto", "none", "constant", "resolution")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# σ is kept off 0: at σ = 0 the input is the clean latent (nothing to learn) and sigma_sqrt's 1/σ² is infinite.
# 1/1000 is the smallest σ of the 1000-step grid diffusers' flow scripts draw from.
SIGMA_MIN = 1e-3

# Flux's resolution shift (its scheduler config: base_image_seq_len, max_image_seq_len, base_shift, max_shift):
# mu grows linearly from 0.5 at 256 packed tokens (a 256 px image) to 1.15 at 4096 tokens (1024 px): one token
# is a 2x2 patch of the 8x-downsampled latent.
FLUX_SHIFT = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


@dataclass(frozen=True)
class FlowSampling:
    """How one family's run draws σ: the density over u, the shift and the loss weighting."""

    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: str = "none"  # "none" | "constant" | "resolution" (resolved: never "auto")
    shift_value: float = 3.0  # the constant shift (SD3: 3.0)
    weighting: str = "none"

    @staticmethod
    def from_training(training: "TrainingSection", default_shift: str,
                      default_value: float | None = None) -> "FlowSampling":
        """The job's choices; ``auto`` takes the family's own shift (Flux dev: resolution, SD3: constant) and,
        if given, the model's own constant (its scheduler's ``shift``) instead of ``flow_shift_value``."""
        auto = training.flow_shift == "auto"
        shift = default_shift if auto else training.flow_shift
        value = default_value if auto and default_value is not None else training.flow_shift_value
        return FlowSampling(
            density=training.flow_timestep_sampling, logit_mean=training.flow_logit_mean,
            logit_std=training.flow_logit_std, mode_scale=training.flow_mode_scale, shift=shift,
            shift_value=value, weighting=training.flow_loss_weighting,
        )


def scheduler_shift(config) -> dict:
    """The resolution shift's parameters from a FlowMatchEulerDiscreteScheduler config (Flux's where it has none),
    read as FluxPipeline and StableDiffusion3Pipeline read them for their dynamic shifting."""
    return {"base_seq_len": config.get("base_image_seq_len", FLUX_SHIFT["base_seq_len"]),
            "max_seq_len": config.get("max_image_seq_len", FLUX_SHIFT["max_seq_len"]),
            "base_shift": config.get("base_shift", FLUX_SHIFT["base_shift"]),
            "max_shift": config.get("max_shift", FLUX_SHIFT["max_shift"])}


def family_sampling(training: "TrainingSection", scheduler_config, constant_default: float) -> FlowSampling:
    """The job's σ sampling for a model with this scheduler: ``auto`` follows it (dynamic shifting: the resolution
    shift; otherwise its constant ``shift``, ``constant_default`` if it has none)."""
    if scheduler_config.get("use_dynamic_shifting"):
        return FlowSampling.from_training(training, "resolution")
    return FlowSampling.from_training(training, "constant", float(scheduler_config.get("shift", constant_default)))


def constant_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: ``s σ / (1 + (s - 1) σ)`` (s > 1 moves σ towards 1, the noisy end)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's shift parameter for an image of ``image_seq_len`` packed tokens (linear in the token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


def resolution_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's exponential time shift: ``e^mu / (e^mu + (1/σ - 1))`` (the scheduler's dynamic shifting)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_sigmas(batch: int, sampling: FlowSampling, generator: torch.Generator,
                  image_seq_len: int | None = None, flux_shift: dict | None = None) -> torch.Tensor:
    """σ for each image of a batch (CPU, float32), drawn from ``generator`` only.

    ``image_seq_len`` (the packed latent's token count) is needed by the resolution shift.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling.density, batch_size=batch, logit_mean=sampling.logit_mean,
        logit_std=sampling.logit_std, mode_scale=sampling.mode_scale, device="cpu", generator=generator,
    ).float()
    # The mode density maps u = 0 to 1 - 0 = 1 and can leave [0, 1] slightly for large scales.
    u = u.clamp(SIGMA_MIN, 1.0)
    if sampling.shift == "constant":
        u = constant_shift(u, sampling.shift_value)
    elif sampling.shift == "resolution":
        if image_seq_len is None:
            raise ValueError("the resolution shift needs the image's token count (image_seq_len)")
        u = resolution_shift(u, flux_mu(image_seq_len, **(flux_shift or FLUX_SHIFT)))
    elif sampling.shift != "none":
        raise ValueError(f"unknown flow shift '{sampling.shift}'; expected one of: none, constant, resolution")
    return u.clamp(SIGMA_MIN, 1.0)


def even_part(latents: torch.Tensor) -> torch.Tensor:
    """The latent cut to even height and width: Flux and SD3 work on 2 x 2 patches (a 1000 px side is a 125-row
    latent); the pipelines round such sizes down to whole patches too."""
    h, w = latents.shape[-2:]
    return latents if h % 2 == 0 and w % 2 == 0 else latents[..., : h - h % 2, : w - w % 2]


def patched_pixels(vae: Any) -> int:
    """Pixels per 2 x 2 latent patch side: the VAE's downsampling x 2 (16 for Flux's and SD3's VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2


def _broadcast(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow interpolation ``(1 - σ) x + σ ε`` (σ per batch item)."""
    s = _broadcast(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What a flow model predicts: ``ε - x`` (d x_σ / dσ)."""
    return noise - latents


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-item loss weights (CPU): none (ones), sigma_sqrt (1/σ²) or cosmap, as diffusers' SD3/Flux scripts."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown flow loss weighting '{weighting}'; expected one of: {', '.join(WEIGHTINGS)}")
    return compute_loss_weighting_for_sd3(weighting, sigmas).float()


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error over each item, then the batch mean (in float32)."""
    per_item = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return (per_item * weights.to(per_item.device)).mean()


@dataclass
class FlowBatch:
    """One step's draw: the noisy input, the target, σ (CPU) and the per-item weights (CPU)."""

    noisy: torch.Tensor
    target: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor


def draw(latents: torch.Tensor, sampling: FlowSampling, generator: torch.Generator,
         image_seq_len: int | None = None, flux_shift: dict | None = None) -> FlowBatch:
    """Noise, σ, noisy latents, target and weights for a batch: everything random from ``generator`` (CPU)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    sigmas = sample_sigmas(latents.shape[0], sampling, generator, image_seq_len, flux_shift)
    return FlowBatch(noisy_latents(latents, noise, sigmas), velocity_target(latents, noise), sigmas,
                     loss_weights(sampling.weighting, sigmas))
