"""`lora-studio grid RUN`: a labelled PNG comparing a run's saved steps (rows) at several strengths (columns)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "grid", help="compare a run's saved steps and strengths in one labelled picture",
        description="Renders every saved LoRA of a run folder (the intermediate ones named by step, then the final "
                    "one) at each strength, with the same prompt and seed, and writes them as one labelled PNG — "
                    "the same grid as Try & Export's “Compare steps”. Cells are cached in RUN/grid/.")
    p.add_argument("run", help="a run folder (what `lora-studio train --out` wrote)")
    p.add_argument("--strengths", default="0, 0.5, 1", help="comma-separated LoRA strengths (default: 0, 0.5, 1)")
    p.add_argument("--prompt", help="prompt (default: the run's first preview prompt, with its trigger word)")
    p.add_argument("--seed", type=int, default=1234, help="seed shared by every cell (default 1234)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    p.add_argument("--out", help="PNG to write (default: RUN/grid.png)")
    return p


def default_prompt(job) -> str:
    prompts = [p.replace("{trigger}", job.dataset.trigger_word).strip() for p in job.sampling.prompts if p.strip()]
    return prompts[0] if prompts else job.dataset.trigger_word or "a photo"


def run(args: argparse.Namespace) -> int:
    from studio.engine.grid import GridError, GridSpec, compose_grid, grid_rows, parse_strengths, render_grid, run_job
    from studio.engine.offline import force_offline
    from studio.engine.safe_load import ModelLoadError

    force_offline()
    run_dir = Path(args.run).expanduser()
    try:
        job = run_job(run_dir)
        rows = grid_rows(run_dir, job.output.name)
        spec = GridSpec(prompt=args.prompt or default_prompt(job), strengths=parse_strengths(args.strengths),
                        seed=args.seed, steps=args.steps, guidance=job.sampling.guidance,
                        negative_prompt=job.sampling.negative_prompt,
                        size=job.sampling.width or job.dataset.resolution)
        from studio.engine.checkpoint import load_model

        print(f"{len(rows)} saved step(s) × {len(spec.strengths)} strength(s); loading {job.model.path}", flush=True)
        bundle = load_model(job.model)

        def show(cell) -> None:
            print(f"  {cell.done}/{cell.total} {rows[cell.row].label} at {spec.strengths[cell.column]:g}×"
                  f"{' (cached)' if cell.cached else ''}", flush=True)

        grid = render_grid(bundle, run_dir, spec, rows, model_path=job.model.path, progress=show)
        out = Path(args.out).expanduser() if args.out else run_dir / "grid.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        compose_grid(grid).save(out)
    except (GridError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(out)
    return EXIT_OK
