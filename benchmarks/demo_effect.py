"""Measure the demo: its run time, and how much its LoRA changes the demo model's pictures (strength 1 vs 0).

    python -m benchmarks.demo_effect [--json benchmarks/results/demo-effect.json] [--grid grid.png]

Runs `lora-studio demo`'s job for real (studio.engine.demo.demo_job), then renders each demo prompt with the base
(strength 0) and with every saved LoRA at strength 1, same seed, through the Compare steps grid
(studio.engine.grid), and reports the mean absolute pixel difference (0–255) per saved step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path


def measure(out_dir: Path, seed: int, steps: int) -> dict:
    from studio.engine.checkpoint import load_model
    from studio.engine.demo import DEMO_PROMPTS, demo_job
    from studio.engine.events import RunFinished
    from studio.engine.grid import GridSpec, grid_rows, mean_difference, render_grid
    from studio.engine.runs import read_metrics
    from studio.engine.trainer import run_training

    job = demo_job(out_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    events = list(run_training(job, threading.Event()))
    run_wall, run_cpu = time.perf_counter() - wall, time.process_time() - cpu
    final = events[-1]
    if not isinstance(final, RunFinished):
        raise SystemExit(f"the demo run did not finish: {final}")
    metrics = read_metrics(final.run_dir)
    rows = grid_rows(final.run_dir, job.output.name)
    bundle = load_model(job.model)
    per_prompt = {}
    grids = []
    for prompt in DEMO_PROMPTS:
        spec = GridSpec(prompt=prompt, strengths=(0.0, 1.0), seed=seed, steps=steps, guidance=job.sampling.guidance,
                        size=job.dataset.resolution)
        grid = render_grid(bundle, final.run_dir, spec, rows, model_path=job.model.path)
        grids.append(grid)
        per_prompt[prompt] = {row.label: round(mean_difference(grid.image(r, 0), grid.image(r, 1)), 2)
                              for r, row in enumerate(rows)}
    final_label = rows[-1].label
    return {
        "run_wall_s": round(run_wall, 1), "run_cpu_s": round(run_cpu, 1), "steps": final.steps,
        "first_loss": metrics[0]["loss"] if metrics else None, "last_loss": metrics[-1]["loss"] if metrics else None,
        "seed": seed, "sampling_steps": steps, "mean_pixel_difference_by_prompt": per_prompt,
        "mean_pixel_difference_final": round(sum(p[final_label] for p in per_prompt.values()) / len(per_prompt), 2),
        "run_dir": str(final.run_dir), "_grids": grids,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--grid", help="also write the first prompt's labelled grid PNG here")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=20, help="denoising steps per picture (Try & Export's default)")
    args = p.parse_args(argv)
    from studio.engine.offline import force_offline

    force_offline()
    import torch

    with tempfile.TemporaryDirectory(prefix="demo-effect-") as tmp:
        report = measure(Path(tmp) / "run", args.seed, args.steps)
        grids = report.pop("_grids")
        if args.grid:
            from studio.engine.grid import compose_grid

            compose_grid(grids[0]).save(args.grid)
    report.update(
        command="python -m benchmarks.demo_effect" + (f" --json {args.json}" if args.json else ""),
        measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), torch=torch.__version__,
        torch_threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    report.pop("run_dir")
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
