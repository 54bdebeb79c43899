"""The run folder: never overwritten, with job.toml, metrics.jsonl, samples/, checkpoints/ and logs/."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.engine.config import Job, save_job

METRICS_FILE = "metrics.jsonl"
JOB_FILE = "job.toml"
LOG_FILE = "run.log"


def new_run_dir(requested: Path) -> Path:
    """``requested`` if it is missing or empty, else the first free ``requested-2``, ``-3``, … (never overwrite)."""
    requested = Path(requested).expanduser()
    if not requested.exists() or (requested.is_dir() and not any(requested.iterdir())):
        return requested
    base = re.sub(r"-\d+$", "", requested.name)
    n = 2
    while True:
        candidate = requested.with_name(f"{base}-{n}")
        if not candidate.exists():
            return candidate
        n += 1


@dataclass
class RunFolder:
    """Paths inside one run folder, plus the writers that fill it (main process only)."""

    root: Path

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    def lora_path(self, name: str, step: int | None = None) -> Path:
        """Final LoRA ``<name>.safetensors``; intermediate ones carry the step so they sort and never collide."""
        suffix = "" if step is None else f"-step{step:06d}"
        return self.root / f"{name}{suffix}.safetensors"

    def create(self, job: Job) -> None:
        for folder in (self.root, self.samples, self.checkpoints, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        save_job(job, self.root / JOB_FILE)


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, folder: RunFolder, start_step: int = 0):
        self._path = folder.metrics
        if start_step:  # a resumed run drops lines past the checkpoint so the file matches the weights
            self._truncate_after(start_step)
        self._fh = open(self._path, "a", encoding="utf-8")
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(folder.logs), purge_step=start_step or None)
        except Exception as exc:  # TensorBoard is optional at run time; metrics.jsonl is the record
            logging.getLogger(__name__).warning("TensorBoard logging off: %s", exc)

    def _truncate_after(self, step: int) -> None:
        if not self._path.is_file():
            return
        kept = [line for line in self._path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        self._path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, step: int, loss: float, lr: float, time_s: float, **extra: float) -> None:
        record = {"step": step, "loss": loss, "lr": lr, "time": round(time_s, 4), **extra}
        self._fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("train/loss", loss, step)
            self._tb.add_scalar("train/lr", lr, step)

    def flush(self) -> None:
        self._fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def attach_log_file(folder: RunFolder) -> logging.Handler:
    """Send the engine's log records to logs/run.log for the length of the run."""
    handler = logging.FileHandler(folder.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("studio").addHandler(handler)
    logging.getLogger("studio").setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("studio").removeHandler(handler)
    handler.close()
