"""Peak GPU memory while a big transformer is loaded for training: fp8 stored on the host first vs cast after the move.

Builds the full-size FLUX.1 [dev] transformer (or SD3.5 Large's) from the bundled config with random bf16 weights in
host memory (no download), then loads it for LoRA training the way the run does (``run_setup``): the LoRA added and
the frozen weights stored in fp8 on the host, then ``Family.place_denoiser`` (tensor by tensor, swapped blocks left
on the host). For comparison the order the run used before: the whole bf16 model to the GPU, then the LoRA, then
the fp8 cast there. Per variant: peak and final ``torch.cuda.max_memory_allocated``, and the frozen bytes placed.

    python -m benchmarks.load_peak [--family flux-dev] [--block-swap 0 20] [--json out.json]
    python -m benchmarks.load_peak --dry-run      # the same path on the tiny model on a CPU (the test suite runs it)

Host memory: one bf16 copy of the transformer at a time (FLUX.1: 23.8 GB) plus its fp8 copy while casting.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch



def build_transformer(family: Any, dry_run: bool) -> torch.nn.Module:
    """The family's transformer with random bf16 weights in host memory (the tiny one for a dry run)."""
    if dry_run:
        return family.build_tiny(seed=0).transformer.to(torch.bfloat16)
    config = family.denoiser_config(family.bundled_config_dir())
    with torch.device("meta"):
        model = family.meta_denoiser(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # small random weights: what matters here is their bytes, not their values
            p.uniform_(-0.02, 0.02, generator=generator)
    return model.train()


def _bundle(family: Any, transformer: torch.nn.Module) -> Any:
    from studio.engine.families import ModelBundle

    return ModelBundle(family=family, prediction_type="flow", denoiser=transformer, vae=None, text_encoders=[],
                       tokenizers=[], noise_scheduler=None, source="random weights")


def _resident_frozen_bytes(bundle: Any) -> int:
    """Frozen bytes the device holds between steps: all but the swapped blocks' (on a GPU: those whose device is
    the GPU; on a CPU dry run, where host and device are one, those outside the swapped blocks)."""
    swap = bundle.extra.get("block_swap")
    away = {id(p) for block in (swap.blocks if swap else []) for p in block.parameters()}
    return sum(p.numel() * p.element_size() for p in bundle.denoiser.parameters()
               if not p.requires_grad and id(p) not in away)


class MovedBytes:
    """Bytes of every ``Tensor.to(<another device>)`` while active (``Module.to`` moves through it too): what is sent
    to the device, by dtype. A CPU dry run has no other device: nothing is counted there."""

    def __enter__(self) -> "MovedBytes":
        self.by_dtype: dict[str, int] = {}
        self._to = real = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            device = kwargs.get("device", args[0] if args and isinstance(args[0], (torch.device, str)) else None)
            if device is not None and torch.device(device).type != tensor.device.type:
                key = str(tensor.dtype).removeprefix("torch.")
                self.by_dtype[key] = self.by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
            return real(tensor, *args, **kwargs)

        torch.Tensor.to = to
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.to = self._to


def load_once(family: Any, order: str, block_swap: int, device: torch.device, dry_run: bool) -> dict:
    """One load for training in ``order`` ("ours" or "cast after move"); memory figures in bytes."""
    from studio.engine.config import LoraSection, TrainingSection
    from studio.engine.families import memory
    from studio.engine.lora import inject_lora

    training = TrainingSection(base_weights_fp8=True, block_swap=block_swap, gradient_checkpointing=True,
                               mixed_precision="bf16")
    lora = LoraSection(rank=16, alpha=16.0)
    cuda = device.type == "cuda"
    built = time.perf_counter()
    bundle = _bundle(family, build_transformer(family, dry_run))
    bf16_bytes = memory.parameter_bytes(bundle.denoiser)
    parameters = sum(p.numel() for p in bundle.denoiser.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    started = time.perf_counter()
    torch.manual_seed(0)
    moved = MovedBytes().__enter__()
    if order == "ours":  # run_setup: LoRA and fp8 on the host, then the family places the denoiser
        inject_lora(bundle, lora, train_text_encoder=False)
        family.apply_speed_options(bundle, training, False)
        family.place_denoiser(bundle, training, device)
    else:  # before: everything onto the device in bf16, then the LoRA and the cast there
        bundle.denoiser.to(device)
        inject_lora(bundle, lora, train_text_encoder=False)
        family.apply_speed_options(bundle, training, False)
        swap = memory.swap_blocks([b for name, group in bundle.denoiser.named_children()
                                   if name.endswith("transformer_blocks") for b in group], block_swap, device)
        if swap is not None:
            bundle.extra["block_swap"] = swap
    moved.__exit__()
    if cuda:
        torch.cuda.synchronize()
    row = {
        "order": order, "block_swap": block_swap, "device": str(device), "parameters": parameters,
        "bf16_bytes": bf16_bytes, "stored_bytes": memory.parameter_bytes(bundle.denoiser),
        "moved_bytes": sum(moved.by_dtype.values()), "moved_by_dtype": moved.by_dtype,
        "frozen_bytes_on_device": _resident_frozen_bytes(bundle),
        "peak_allocated": (torch.cuda.max_memory_allocated(device) - before) if cuda else None,
        "final_allocated": (torch.cuda.memory_allocated(device) - before) if cuda else None,
        "load_s": round(time.perf_counter() - started, 2), "build_s": round(started - built, 2),
    }
    del bundle
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def markdown(report: dict) -> str:
    from studio.engine.devices import format_bytes

    lines = [f"Load peak, {report['family']} transformer ({report['parameters'] / 1e6:,.1f} M parameters) on "
             f"{report['device_name'] or 'CPU (dry run)'}", "",
             "| order | blocks swapped | peak allocated | after load | sent to the device | frozen bytes kept there | load s |",
             "|---|---|---|---|---|---|---|"]

    def gb(v: int | None) -> str:
        return "–" if v is None else format_bytes(v)

    for r in report["results"]:
        sent = ", ".join(f"{gb(v)} {k}" for k, v in sorted(r["moved_by_dtype"].items(), key=lambda kv: -kv[1])) or "–"
        lines.append(f"| {r['order']} | {r['block_swap']} | {gb(r['peak_allocated'])} | {gb(r['final_allocated'])} | "
                     f"{sent} | {gb(r['frozen_bytes_on_device'])} | {r['load_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux-dev", help="flux-dev, flux-schnell, sd3.5-large …")
    parser.add_argument("--block-swap", type=int, nargs="+", default=[0, 20])
    parser.add_argument("--orders", nargs="+", default=["ours", "cast after move"], choices=["ours", "cast after move"])
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU (checks the script only)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    from studio.engine.families import get_family

    family = get_family(args.family)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA GPU: nothing to measure (use --dry-run to check the script on the tiny model)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    results = [load_once(family, order, swap, device, args.dry_run) for swap in args.block_swap for order in args.orders]
    report = {"suite": "load-peak" + ("-dry" if args.dry_run else ""), "family": family.name,
              "device_name": torch.cuda.get_device_name(device) if cuda else None,
              "parameters": results[0]["parameters"], "results": results}
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
