"""`lora-studio merge BASE LORA --strength 0.8 --out merged.safetensors`: bake a LoRA into a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DTYPES = ("fp16", "bf16", "fp32")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge", help="bake a LoRA into a base model (one .safetensors checkpoint)",
        description="Add a kohya-format LoRA to a base model's weights at the given strength and save the result as "
                    "a single-file checkpoint in the original layout, which AUTOMATIC1111, Forge and ComfyUI load.",
    )
    p.add_argument("base", help="base model: .safetensors/.ckpt file, diffusers folder or cached hub id")
    p.add_argument("lora", help="LoRA file (.safetensors, kohya layout as LoRA Studio exports)")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength, as in A1111's <lora:name:0.8> (default 1.0)")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="precision of the saved checkpoint (default fp16)")
    p.add_argument("--vae", default="", help="bake this VAE file in instead of the model's own")
    p.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"), default="auto",
                   help="the base model's prediction type when it cannot be detected (recorded in the metadata)")
    p.add_argument("--config-dir", default="", help="diffusers config folder for a checkpoint of unusual shape")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from studio.engine.checkpoint import ModelLoadError
    from studio.engine.config import ModelSection
    from studio.engine.merge import merge_lora_into_checkpoint

    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        print(f"error: '{out}' exists; choose another name or pass --overwrite", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not -10.0 <= args.strength <= 10.0:
        print(f"error: --strength {args.strength:g} is outside -10…10", file=sys.stderr)
        return EXIT_BAD_INPUT
    base = ModelSection(path=args.base, prediction_type=args.prediction_type, vae=args.vae, config_dir=args.config_dir)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        result = merge_lora_into_checkpoint(base, args.lora, args.strength, out, dtype,
                                            progress=lambda msg: print(f"{msg}…", file=sys.stderr))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: cannot write '{out}': {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    parts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in result["by_component"].items())
    print(f"Wrote {result['path']} ({result['size_bytes'] / 1e9:.1f} GB, {result['dtype']}): "
          f"{result['modules_merged']} modules baked at strength {result['strength']:g} ({parts}) "
          f"in {result['time_s']:.1f} s")
    if result["unmatched"]:
        print(f"warning: {len(result['unmatched'])} LoRA module(s) have no counterpart in this model and were "
              f"skipped (e.g. {result['unmatched'][0]})", file=sys.stderr)
    return EXIT_OK
