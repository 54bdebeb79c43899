"""The demo's settings, in one place: `lora-studio demo`, the window's demo model and its demo images all use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.engine.config import BUILTIN_DEMO_MODEL, Job

DEMO_STEPS = 50
DEMO_LR = 3e-3  # high for a LoRA, as a 50-step demo needs; 1e-2 overwrote the shapes with texture
DEMO_RESOLUTION = 64  # the demo model's native size (resources/demo/train_demo_model.py)
DEMO_TRIGGER = "studioshape"
DEMO_PROMPTS = ("studioshape, a red circle", "studioshape, a blue square", "studioshape, a green triangle")


def demo_dataset_path() -> Path:
    from studio.paths import resource_path

    return resource_path("demo", "dataset")


def demo_model_folder() -> Path:
    """The shipped weights of the demo model (without a tokenizer: the app adds its bundled CLIP tokenizer)."""
    from studio.paths import resource_path

    return resource_path("demo", "model")


def demo_model_size_bytes() -> int:
    folder = demo_model_folder()
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def demo_model_settings(steps: int = DEMO_STEPS) -> dict[str, Any]:
    """What choosing the demo model sets (dotted job fields): its size, and a recipe that learns within a minute.

    The demo model is small: a LoCon (LoRA on the convolutions too) at a high learning rate is what makes its
    style change visible within the demo's ~50 steps; SD's usual 1e-4 on attention only barely moves it.
    """
    return {
        "dataset.resolution": DEMO_RESOLUTION,
        "dataset.bucket_step": 16,
        "lora.rank": 4,
        "lora.alpha": 4.0,
        "lora.targets": "+conv",
        "training.steps": steps,
        "training.lr": DEMO_LR,
        "sampling.every": max(1, steps // 2),
        "sampling.steps": 10,
        "sampling.prompts": list(DEMO_PROMPTS[:2]),
        # Intermediate LoRAs at every fifth of the run, all kept: Try & Export's grid compares them.
        "output.save_every": max(1, steps // 5),
        "output.keep_last_loras": 0,
        # Two of the eight images held out: the Train page's validation curve shows the LoRA learning the style on
        # pictures it never trained on, and marks the best step.
        "validation.split": 2,
        "validation.every": max(1, steps // 5),
    }


def demo_dataset_settings() -> dict[str, Any]:
    """What choosing the demo images sets: the bundled striped shapes and their trigger word."""
    return {"dataset.path": str(demo_dataset_path()), "dataset.trigger_word": DEMO_TRIGGER}


def demo_job(out_dir: Path | str | None = None, steps: int = DEMO_STEPS) -> Job:
    """The whole demo: the demo model and images with their settings, written to ``out_dir``."""
    from studio.engine.config import apply_overrides
    from studio.paths import user_data_dir

    job = Job()
    job.model.path = BUILTIN_DEMO_MODEL
    apply_overrides(job, {**demo_model_settings(steps), **demo_dataset_settings()})
    job.output.name = "demo-lora"
    job.output.dir = str(out_dir or user_data_dir() / "runs" / "demo")
    return job
