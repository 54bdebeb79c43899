"""`lora-studio lora resize|merge`: LoRA tools on files (SVD resize with the kept norm fraction; merge at strengths)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("lora", help="LoRA tools: resize to a lower rank, merge several LoRAs into one",
                       description="Tools on kohya-layout LoRA files. Bake a LoRA (any type) into a checkpoint with "
                                   "`lora-studio merge`.")
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    r = tools.add_parser("resize", help="cut a LoRA to a lower rank by SVD", description=(
        "Resize each module by SVD. --rank caps the rank; --fraction keeps the fewest ranks whose singular values "
        "hold at least that fraction of ‖ΔW‖ (Frobenius norm) in every module. Prints the kept fraction."))
    r.add_argument("src", help="LoRA file (.safetensors, kohya layout)")
    r.add_argument("--out", required=True, help="output file (.safetensors)")
    r.add_argument("--rank", type=int, default=None, help="largest rank to keep")
    r.add_argument("--fraction", type=float, default=None, help="norm fraction to keep, e.g. 0.9")
    r.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m = tools.add_parser("merge", help="merge LoRAs into one at chosen strengths", description=(
        "One LoRA equal to the sum of the inputs at their strengths (exact; the ranks add up). --rank then "
        "resizes the result by SVD."))
    m.add_argument("sources", nargs="+", metavar="LORA[:STRENGTH]", help="LoRA files, each optionally :strength (default 1)")
    m.add_argument("--out", required=True, help="output file (.safetensors)")
    m.add_argument("--rank", type=int, default=None, help="resize the merged LoRA to this rank")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def _source(text: str) -> tuple[str, float]:
    path, sep, strength = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def run(args: argparse.Namespace) -> int:
    from studio.engine.lora_tools import LoraToolError, merge_loras, resize_lora

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".safetensors":
        print(f"error: '{out.name}': LoRAs are written as .safetensors; choose a name ending in .safetensors", file=sys.stderr)
        return EXIT_BAD_INPUT
    if out.exists() and not args.overwrite:
        print(f"error: '{out}' exists; choose another name or pass --overwrite", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.tool == "resize":
            r = resize_lora(Path(args.src).expanduser(), out, rank=args.rank, fraction=args.fraction)
            ranks = ", ".join(f"rank {k}: {n}" for k, n in r.ranks.items())
            print(f"Resized {r.modules} modules from rank {r.rank_before} to at most {r.rank_after} ({ranks}); kept "
                  f"{r.kept_fraction:.2%} of the LoRA's Frobenius norm (worst module {r.worst_module_fraction:.2%}). "
                  f"Wrote {r.path}")
        else:
            result = merge_loras([_source(s) for s in args.sources], out, rank=args.rank)
            kept = f"; kept {result['kept_fraction']:.2%} of the norm" if "kept_fraction" in result else ""
            print(f"Merged {result['sources']} LoRAs into {result['modules']} modules of rank {result['rank']}{kept}. "
                  f"Wrote {result['path']}")
    except LoraToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK
