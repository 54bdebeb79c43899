"""Train the built-in demo model from scratch on generated shapes (≈15 min of one CPU core); see README.md here.

Run from the repository root:  python resources/demo/train_demo_model.py [--out resources/demo/model]

The result is a diffusers SD1-architecture folder (tiny UNet, small VAE, tiny CLIP text encoder that uses the
app's bundled CLIP tokenizer) saved in fp16. The tokenizer is not stored here: the app adds its bundled copy when
it prepares the model (studio.engine.checkpoint.demo_model_path).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repository root, for `studio`

from shapes import random_shape, render_shape  # noqa: E402

SIZE = 64  # image size in pixels; the VAE downsamples 4× to a 16 × 16 latent
TEXT_DIM = 32


# --------------------------------------------------------------------------------------------- the parts


def build_vae():
    from diffusers import AutoencoderKL

    # No attention in the VAE: fully convolutional, so it can be trained on crops (4× cheaper) and used whole.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    # The full CLIP vocabulary (the bundled tokenizer's ids) but a 32-wide, 2-layer transformer.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))


# ---------------------------------------------------------------------------------------------- the data


def to_tensor(images) -> torch.Tensor:
    """PIL images → a float batch in [-1, 1], as Stable Diffusion's VAE expects."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def nonsense_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 11)))


def training_caption(shape, rng: random.Random) -> str:
    """The caption, sometimes dropped (so classifier-free guidance has an unconditional model) or prefixed with a
    made-up word: users prompt "<trigger word>, a red circle", and the base must draw the circle regardless."""
    if rng.random() < 0.1:
        return ""
    caption = shape.caption()
    if rng.random() < 0.35:
        caption = f"{nonsense_word(rng)}, {caption}"
    return caption


# ---------------------------------------------------------------------------------------------- training


def train_vae(vae, steps: int, batch: int, rng: random.Random, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    crop = SIZE // 2
    vae.train()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        # A third of the pictures in the demo dataset's striped style, so the decoder can draw what the LoRA learns.
        shapes = [random_shape(rng, "striped" if rng.random() < 0.35 else "flat") for _ in range(batch)]
        images = to_tensor([render_shape(s, SIZE) for s in shapes])
        x0, y0 = rng.randrange(0, SIZE - crop + 1, 4), rng.randrange(0, SIZE - crop + 1, 4)
        x = images[:, :, y0:y0 + crop, x0:x0 + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step:4d}/{steps} loss {loss.item():.4f}")


@torch.no_grad()
def encode_pool(vae, count: int, rng: random.Random) -> tuple[torch.Tensor, list]:
    vae.eval()
    shapes = [random_shape(rng, "flat") for _ in range(count)]
    latents = []
    for start in range(0, count, 64):
        images = to_tensor([render_shape(s, SIZE) for s in shapes[start:start + 64]])
        latents.append(vae.encode(images).latent_dist.mean)
    return torch.cat(latents), shapes


class Ema:
    """An exponential moving average of the weights (its warm-up makes early averages follow the model closely)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.995):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def train_denoiser(unet, text_encoder, tokenizer, latents, shapes, steps: int, batch: int, rng: random.Random,
                   log, peak_lr: float = 1e-3, warmup: int = 50) -> None:
    from diffusers import DDPMScheduler

    from studio.engine.families.sd import SCHEDULER_CONFIG

    scheduler = DDPMScheduler(**SCHEDULER_CONFIG, prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    ema_unet, ema_text = Ema(unet), Ema(text_encoder)
    unet.train()
    text_encoder.train()
    alphas = scheduler.alphas_cumprod
    for step in range(steps):
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = [rng.randrange(len(shapes)) for _ in range(batch)]
        x0 = latents[idx]
        captions = [training_caption(shapes[i], rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        # Min-SNR-5 weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
        # converges several times faster, which is what a 15-minute CPU budget needs.
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        if step % 25 == 0 or step == steps - 1:
            log(f"denoiser step {step:4d}/{steps} loss {loss.item():.4f} lr {lr:.2e}")
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)


# ------------------------------------------------------------------------------------------------ saving


def load_parts(folder: Path):
    """The VAE, UNet and text encoder of a folder this script wrote, in fp32 for further training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"torch_dtype": torch.float32}
    return (AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw),
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw))


def save(folder: Path, unet, vae, text_encoder, tokenizer) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from studio.engine.families.sd import SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG, prediction_type="epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")  # the app supplies its bundled CLIP tokenizer (resources/tokenizers/clip)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "model"), help="output folder (default: resources/demo/model)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=900, help="denoiser steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pool", type=int, default=3000, help="how many generated pictures the denoiser learns from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="the denoiser's peak learning rate")
    p.add_argument("--continue-from", help="a folder this script wrote: keep its VAE, train its UNet and text "
                                           "encoder further (the shipped model was made in two such rounds)")
    args = p.parse_args(argv)

    from studio.engine.tokenizers import load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    tokenizer = load_tokenizer("clip-l")
    if args.continue_from:
        vae, unet, text_encoder = load_parts(Path(args.continue_from))
        latents, shapes = encode_pool(vae, args.pool, rng)
        scale = float(vae.config.scaling_factor)
    else:
        vae, unet, text_encoder = build_vae(), build_unet(), build_text_encoder()
        train_vae(vae, args.vae_steps, args.batch, rng, log)
        latents, shapes = encode_pool(vae, args.pool, rng)
        # Stable Diffusion scales latents to unit variance; the factor is measured, as SD's 0.18215 was.
        scale = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scale)
    log(f"latent scaling factor {scale:.4f}")
    train_denoiser(unet, text_encoder, tokenizer, latents * scale, shapes, args.steps, args.batch, rng, log,
                   peak_lr=args.lr, warmup=50 if not args.continue_from else 10)
    out = Path(args.out)
    save(out, unet, vae, text_encoder, tokenizer)
    rounds = []
    if args.continue_from and (Path(args.continue_from) / "training.json").is_file():
        rounds = json.loads((Path(args.continue_from) / "training.json").read_text())["rounds"]
    rounds.append({
        "seed": args.seed, "vae_steps": 0 if args.continue_from else args.vae_steps, "steps": args.steps,
        "lr": args.lr, "batch": args.batch, "pool": args.pool, "continued": bool(args.continue_from),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - started),
    })
    (out / "training.json").write_text(json.dumps({"script": "resources/demo/train_demo_model.py", "rounds": rounds},
                                                  indent=2) + "\n")
    log(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
