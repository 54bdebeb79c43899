"""`lora-studio demo`: the built-in default end to end — the small demo model, bundled shapes dataset, ~1 minute on a CPU."""

from __future__ import annotations

import argparse

from studio.engine.demo import DEMO_STEPS, demo_job

__all__ = ["add_parser", "demo_job", "run"]  # demo_job lives in the engine (the window uses it too)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="train a tiny demo LoRA end to end (no model needed)",
                       description="Runs the built-in demo: the small demo model that comes with LoRA Studio (it "
                                   "draws simple coloured shapes) learns the bundled striped shapes in about a "
                                   "minute, with samples, intermediate LoRAs and export.")
    p.add_argument("--out", help="run folder (default: a new folder under the app's data folder)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default {DEMO_STEPS})")
    return p


def run(args: argparse.Namespace) -> int:
    import threading

    from studio.commands.train import _stop_on_interrupt, consume
    from studio.engine.trainer import run_training

    print("LoRA Studio demo: the demo model draws flat shapes; the LoRA teaches it the bundled striped style. "
          "Real results need a real checkpoint.")
    stop = threading.Event()
    _stop_on_interrupt(stop)
    return consume(run_training(demo_job(args.out, args.steps), stop))
