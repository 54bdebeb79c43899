"""Jobs and run folders for tests: the tiny job most engine tests train, and a real finished run folder with
intermediate LoRAs (for the grid tests)."""

from __future__ import annotations

from pathlib import Path


def tiny_job(model: Path, data: Path, out: Path, **overrides) -> "Job":
    """A 3-step, 64 px, rank-4 job on a tiny model; ``section__field=value`` overrides any setting."""
    from studio.engine.config import Job

    job = Job()
    job.model.path = str(model)
    job.dataset.path = str(data)
    job.dataset.resolution = 64
    job.dataset.bucket_step = 16
    job.lora.rank = 4
    job.lora.alpha = 4.0
    job.training.steps = 3
    job.training.lr = 1e-3
    job.sampling.every = 0
    job.sampling.steps = 2
    job.output.dir = str(out)
    job.output.name = "tiny"
    for path, value in overrides.items():
        section, name = path.split("__")
        setattr(getattr(job, section), name, value)
    return job


def make_tiny_run(model: Path, data: Path, out: Path, *, steps: int = 4, save_every: int = 2, lr: float = 5e-2) -> Path:
    """Train ``model`` on ``data`` for real, saving a LoRA every ``save_every`` steps; returns the run folder."""
    from studio.engine.events import RunFinished
    from studio.engine.trainer import run_training

    job = tiny_job(model, data, out, lora__targets="+conv", training__steps=steps,
                   training__lr=lr,  # high, so a few steps change the pictures measurably
                   sampling__prompts=["zzshape, a red circle"], output__save_every=save_every,
                   output__keep_last_loras=0)
    events = list(run_training(job))
    assert isinstance(events[-1], RunFinished), events[-1]
    return Path(events[-1].run_dir)
