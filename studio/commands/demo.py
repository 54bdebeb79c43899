"""`lora-studio demo`: the built-in default end to end — tiny random model, bundled shapes dataset, ~1 minute on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.engine.config import BUILTIN_DEMO_MODEL, Job
from studio.paths import resource_path, user_data_dir


def demo_job(out_dir: Path | str | None = None, steps: int = 50) -> Job:
    """The demo's job: also what the GUI starts with when the user has no model of their own."""
    job = Job()
    job.model.path = BUILTIN_DEMO_MODEL
    job.dataset.path = str(resource_path("demo", "dataset"))
    job.dataset.trigger_word = "studioshape"
    job.dataset.resolution = 64  # the tiny model's native size
    job.dataset.bucket_step = 16
    job.lora.rank = 4
    job.lora.alpha = 4.0
    # The tiny model has few attention layers: LoCon and a high learning rate make the loss visibly fall
    # within the demo's few steps (0.9 → 0.3 over 60 steps), which is what the demo is there to show.
    job.lora.targets = "+conv"
    job.training.steps = steps
    job.training.lr = 1e-2
    job.sampling.every = max(1, steps // 2)
    job.sampling.steps = 10
    job.sampling.prompts = ["studioshape, a red circle", "studioshape, a blue square"]
    job.output.name = "demo-lora"
    job.output.dir = str(out_dir or user_data_dir() / "runs" / "demo")
    return job


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="train a tiny demo LoRA end to end (no model needed)",
                       description="Runs the built-in demo: a tiny random model (real results need a real "
                                   "checkpoint) trained on a bundled example dataset, with samples and export.")
    p.add_argument("--out", help="run folder (default: a new folder under the app's data folder)")
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    return p


def run(args: argparse.Namespace) -> int:
    import threading

    from studio.commands.train import _stop_on_interrupt, consume
    from studio.engine.trainer import run_training

    print("LoRA Studio demo: a tiny random model, so the samples are noise-like; real results need a real checkpoint.")
    stop = threading.Event()
    _stop_on_interrupt(stop)
    return consume(run_training(demo_job(args.out, args.steps), stop))
