"""Models and datasets the benchmarks train on: a small SD-architecture model for CPUs, full-size random SD1.5/SDXL.

Everything is built from random weights and written as an ordinary diffusers folder, so the benchmark loads it
through the engine's real loader exactly as it would load a downloaded model. Folders are cached by a hash of
their spec, so only the first benchmark run pays for building them.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

# The CPU benchmark model. It keeps SD1.5's layout (cross-attention in every level but the last, two ResNets per
# level, an 8x VAE, a CLIP text encoder) at a fifth of its width, so one step is dominated by the same kinds of
# work (convolutions, attention, GEMMs) instead of by Python overhead as the 32-channel test models are. Head
# width 32 keeps attention close to SD's arithmetic intensity (SD1.5: 40-160). The VAE is sized so encoding an
# image costs about as much, relative to a training step, as SD1.5's VAE does (FACTS.md: ~65 %).
SMALL = {
    "unet": {
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [2, 4, 8],  # SD1's config uses this name for the number of heads
        "cross_attention_dim": 256,
        "norm_num_groups": 32,
        "sample_size": 32,
    },
    "vae": {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1},
    "text": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4},
    "resolution": 256,
}

# The engine's own test model (tiny.py), for the smoke test: seconds per run, numbers meaningless.
TINY = {
    "unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
        "sample_size": 32,
    },
    "vae": {"block_out_channels": [32, 64], "layers_per_block": 1},
    "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
    "resolution": 64,
}

SPECS = {"small": SMALL, "tiny": TINY}
# Full-size architectures with random weights, from the diffusers configs the app ships.
FULL_SIZE = {"sd1": ("sd1", 512), "sdxl": ("sdxl", 1024)}


def spec_hash(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_folder(folder: Path, build) -> Path:
    """Build into ``<folder>.partial`` and rename, so an interrupted build is never mistaken for a model."""
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_small_model(spec: dict, folder: Path, seed: int = 0) -> Path:
    """Write an SD1-layout diffusers folder with random weights described by ``spec`` (see SMALL)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.engine.families.sd import SCHEDULER_CONFIG
    from studio.engine.tokenizers import load_tokenizer

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        vae_widths = spec["vae"]["block_out_channels"]
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
            block_out_channels=vae_widths, layers_per_block=spec["vae"]["layers_per_block"],
            down_block_types=["DownEncoderBlock2D"] * len(vae_widths), up_block_types=["UpDecoderBlock2D"] * len(vae_widths),
            sample_size=spec["resolution"], scaling_factor=0.18215,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
            hidden_act="quick_gelu", projection_dim=spec["text"]["hidden_size"], **spec["text"],
        ))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=load_tokenizer("clip-l"),
            unet=unet, scheduler=DDPMScheduler(**SCHEDULER_CONFIG, prediction_type="epsilon"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)

    return _atomic_folder(Path(folder), build)


def build_full_size_model(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """The real SD1.5 or SDXL architecture with random weights, saved in ``dtype`` (half the disk of fp32).

    Speed and memory do not depend on the weights' values, so this measures what a user's model would cost
    without downloading one. Built on the GPU when there is one (initialising 2.6 G parameters on a CPU is slow).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.engine.families import get_family
    from studio.engine.tokenizers import write_tokenizer
    from studio.paths import resource_path

    configs = resource_path("model_configs", family)
    if not (configs / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"bundled configs for '{family}' are missing at {configs}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        shutil.copytree(configs, tmp, dirs_exist_ok=True)  # model_index, scheduler, configs
        spec = get_family(family)
        for encoder, tokenizer in zip(spec.text_encoder_names, spec.tokenizer_names):  # the bundled ones, by name
            write_tokenizer(tokenizer, tmp / encoder.replace("text_encoder", "tokenizer", 1))
        with torch.device(device):
            parts: dict[str, Any] = {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
            }
            if (configs / "text_encoder_2").is_dir():
                parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
        for name, module in parts.items():
            module.to(dtype).save_pretrained(tmp / name, safe_serialization=True)
            del module
        parts.clear()
        if device == "cuda":
            torch.cuda.empty_cache()

    return _atomic_folder(Path(folder), build)


def model_folder(name: str, cache: Path) -> tuple[Path, int]:
    """(diffusers folder, native resolution) for ``small``, ``tiny``, ``sd1``, ``sdxl`` or an existing model path."""
    if name in SPECS:
        spec = SPECS[name]
        return build_small_model(spec, cache / f"{name}-{spec_hash(spec)}"), spec["resolution"]
    if name in FULL_SIZE:
        family, resolution = FULL_SIZE[name]
        return build_full_size_model(family, cache / f"{name}-random-fp16"), resolution
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model '{name}' is neither a preset ({', '.join([*SPECS, *FULL_SIZE])}) nor a path")
    return path, 512


def make_dataset(folder: Path, count: int, resolution: int, *, mixed_aspect: bool = False, seed: int = 0) -> Path:
    """``count`` JPEG photos-like images (noise + shapes, so decoding costs what a real JPEG costs) with captions.

    ``mixed_aspect``: a quarter landscape and a quarter portrait, so bucketing forms three buckets.
    Images are 1.5x the training resolution: the data path then resizes, as it does with real datasets.
    """
    from PIL import Image, ImageDraw, ImageFilter

    folder = Path(folder)
    marker = folder.with_name(folder.name + ".complete")  # beside, not inside: the scan would list it
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square"]
    side = resolution * 3 // 2
    for i in range(count):
        w, h = side, side
        if mixed_aspect and i % 4 == 1:
            w, h = side * 3 // 2, side
        elif mixed_aspect and i % 4 == 2:
            w, h = side, side * 3 // 2
        noise = (torch.rand(h // 8, w // 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(img)
        colour, shape = colours[i % len(colours)], shapes[(i // len(colours)) % 2]
        box = [w // 4 + rng.randrange(w // 8), h // 4 + rng.randrange(h // 8), 3 * w // 4, 3 * h // 4]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        img.save(folder / f"img_{i:03d}.jpg", quality=90)
        (folder / f"img_{i:03d}.txt").write_text(f"a {colour} {shape}, photo", encoding="utf-8")
    marker.write_text("ok")
    return folder
