"""A real finished run folder with intermediate LoRAs (for the grid tests): a tiny model trained a few steps."""

from __future__ import annotations

from pathlib import Path


def make_tiny_run(model: Path, data: Path, out: Path, *, steps: int = 4, save_every: int = 2, lr: float = 5e-2) -> Path:
    """Train ``model`` on ``data`` for real, saving a LoRA every ``save_every`` steps; returns the run folder."""
    from studio.engine.config import Job
    from studio.engine.events import RunFinished
    from studio.engine.trainer import run_training

    job = Job()
    job.model.path = str(model)
    job.dataset.path = str(data)
    job.dataset.resolution = 64
    job.dataset.bucket_step = 16
    job.lora.rank = 4
    job.lora.alpha = 4.0
    job.lora.targets = "+conv"
    job.training.steps = steps
    job.training.lr = lr  # high, so a few steps change the pictures measurably
    job.sampling.every = 0
    job.sampling.steps = 2
    job.sampling.prompts = ["zzshape, a red circle"]
    job.output.dir = str(out)
    job.output.name = "tiny"
    job.output.save_every = save_every
    job.output.keep_last_loras = 0
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    return Path(events[-1].run_dir)
