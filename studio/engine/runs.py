"""The run folder: never overwritten, with job.toml, metrics.jsonl, samples/, checkpoints/ and logs/; finding runs to resume.

Nothing here imports torch, so the GUI can list unfinished runs and the CLI can check ``--resume`` cheaply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.engine.config import ConfigError, Job, Problem, get_value, iter_fields, load_job, save_job

METRICS_FILE = "metrics.jsonl"
JOB_FILE = "job.toml"
LOG_FILE = "run.log"
CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"  # small JSON next to each checkpoint's state: step and total without loading tensors
STATE_FILE = "state.pt"
LORA_FILE = "lora.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_SAMPLE = re.compile(r"^step(\d{6,})_\d+\.png$")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- choosing a folder


def new_run_dir(requested: Path) -> Path:
    """``requested`` if it is missing or empty, else the first free ``requested-2``, ``-3``, … (never overwrite).

    Only a prediction (the GUI shows it); ``claim_run_dir`` is what a run uses, since another run may take
    the name between this check and the first write.
    """
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


def claim_run_dir(requested: Path) -> Path:
    """Create and return a run folder nobody else has: ``requested`` or the first free ``requested-N``.

    The claim is ``mkdir`` of the folder's ``checkpoints/``, which the OS grants to exactly one caller, so two
    runs started at the same moment with the same output folder still get different folders.
    """
    requested = Path(requested).expanduser()
    base = re.sub(r"-\d+$", "", requested.name)
    candidates = [requested]
    n = 2
    while True:
        for candidate in candidates:
            if _try_claim(candidate):
                return candidate
        candidates = [requested.with_name(f"{base}-{n}")]
        n += 1


def _try_claim(candidate: Path) -> bool:
    try:
        candidate.mkdir(parents=True)
    except FileExistsError:
        if not candidate.is_dir() or any(p.name != CHECKPOINTS for p in candidate.iterdir()):
            return False  # a file, or a folder with something in it: never reuse
    try:
        (candidate / CHECKPOINTS).mkdir()
    except FileExistsError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the folder


@dataclass
class RunFolder:
    """Paths inside one run folder, plus the writers that fill it (main process only)."""

    root: Path

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def job_file(self) -> Path:
        return self.root / JOB_FILE

    def lora_path(self, name: str, step: int | None = None) -> Path:
        """Final LoRA ``<name>.safetensors``; intermediate ones carry the step so they sort and never collide."""
        suffix = "" if step is None else f"-step{step:06d}"
        return self.root / f"{name}{suffix}.safetensors"

    def create(self, job: Job) -> None:
        for folder in (self.root, self.samples, self.checkpoints, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        save_job(job, self.job_file)

    def forget_after(self, step: int, name: str) -> list[Path]:
        """Before a resume from ``step``: remove what the interrupted run wrote past it, and its half-written files.

        Samples and intermediate LoRAs of later steps came from a trajectory that is being replayed (they are
        written again, identically); ``*.partial`` files and half-made checkpoint folders are what a killed
        process leaves behind. Returns what was removed.
        """
        removed: list[Path] = []
        for path in self.samples.glob("step*.png") if self.samples.is_dir() else []:
            m = _SAMPLE.match(path.name)
            if m and int(m.group(1)) > step:
                removed.append(path)
        prefix = re.compile(rf"^{re.escape(name)}-step(\d{{6,}})(?:-diffusers)?\.safetensors$")
        for path in self.root.glob(f"{name}-step*.safetensors"):
            m = prefix.match(path.name)
            if m and int(m.group(1)) > step:
                removed.append(path)
        for folder in (self.root, self.samples, self.checkpoints, self.logs):
            if folder.is_dir():
                removed += [p for p in folder.iterdir() if p.name.startswith(".") and ".partial" in p.name]
        for _, path in list_checkpoints(self.checkpoints):
            if _step_of_dir(path) > step:
                removed.append(path)
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return removed


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _step_of_dir(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first.

    A checkpoint folder appears under its ``step-NNNNNN`` name only by a rename once every file in it is
    written (see state.save_checkpoint); the file check also rejects folders from before that rule.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file() and (child / LORA_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_meta(folder: Path) -> dict[str, Any]:
    """The small JSON saved with a checkpoint (step, total_steps, epoch, …); {} for older checkpoints."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------------------------------------- unfinished runs


@dataclass(frozen=True)
class UnfinishedRun:
    """A run that saved a checkpoint but never wrote its final LoRA: the GUI offers to resume it."""

    run_dir: Path
    job: Job
    step: int  # of the latest complete checkpoint
    total_steps: int
    mtime: float  # of that checkpoint (seconds since the epoch), to sort and to say "2 hours ago"


def unfinished_run(run_dir: Path) -> UnfinishedRun | None:
    """The run in ``run_dir`` if it can be resumed (job.toml readable, a checkpoint, no final LoRA), else None."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    try:
        job = load_job(folder.job_file)
    except (ConfigError, OSError):
        return None
    if folder.lora_path(job.output.name).exists():
        return None
    latest = latest_checkpoint(folder.checkpoints)
    if latest is None:
        return None
    meta = checkpoint_meta(latest)
    step = _step_of_dir(latest)
    total = int(meta.get("total_steps") or (job.training.steps if job.training.epochs == 0 else 0))
    try:
        mtime = latest.stat().st_mtime
    except OSError:
        return None
    return UnfinishedRun(run_dir, job, step, total, mtime)


def find_unfinished_runs(parent_dir: Path) -> list[UnfinishedRun]:
    """Unfinished runs in ``parent_dir`` itself and its immediate sub-folders, newest first."""
    parent = Path(parent_dir).expanduser()
    if not parent.is_dir():
        return []
    found = []
    for folder in [parent, *sorted(p for p in parent.iterdir() if p.is_dir())]:
        run = unfinished_run(folder)
        if run is not None:
            found.append(run)
    return sorted(found, key=lambda r: r.mtime, reverse=True)


# ---------------------------------------------------------------------------------------- resume: what may change

# Changing these makes the saved state meaningless for the job (weights of another shape, optimizer state of
# another kind, a data order or step plan that no longer matches), so a resume refuses.
MUST_MATCH = (
    "model.path", "model.family", "model.prediction_type", "model.vae", "model.config_dir",
    "dataset.path", "dataset.caption_extension", "dataset.repeats", "dataset.default_repeats",
    "dataset.resolution", "dataset.buckets", "dataset.bucket_step",
    "lora.rank", "lora.alpha", "lora.targets", "lora.conv_rank", "lora.conv_alpha", "lora.dora",
    "lora.train_text_encoder",
    "training.epochs", "training.batch_size", "training.gradient_accumulation", "training.optimizer",
    "training.scheduler", "training.warmup_steps", "training.seed",
    "output.name",
)
# Where the run folder was first asked for does not matter any more: the run continues where it is.
_IGNORED = ("output.dir",)


def job_changes(before: Job, after: Job) -> tuple[list[Problem], list[str]]:
    """(refusals, notes): fields a resume must keep but that changed, and the changes it accepts."""
    refusals, notes = [], []
    for info in iter_fields():
        if info.path in _IGNORED:
            continue
        old, new = get_value(before, info.path), get_value(after, info.path)
        if old == new:
            continue
        if info.path in MUST_MATCH:
            refusals.append(Problem(info.path, f"was {old!r} when the run started, now {new!r}; a resumed run must keep "
                                    "it (change it back, or start a new run)"))
        else:
            notes.append(f"{info.path}: {old!r} → {new!r}")
    return refusals, notes


def saved_job(run_dir: Path) -> Job:
    """The job the run's latest checkpoint was made with (falls back to the run's job.toml)."""
    folder = RunFolder(Path(run_dir))
    latest = latest_checkpoint(folder.checkpoints)
    if latest is not None and (latest / JOB_FILE).is_file():
        return load_job(latest / JOB_FILE)
    return load_job(folder.job_file)


def resume_problems(run_dir: Path | str, job: Job | None = None) -> list[Problem]:
    """Everything that stops ``run_dir`` from being resumed with ``job`` (None: its own job), reported at once."""
    run_dir = Path(run_dir).expanduser()
    where = "--resume"
    if not run_dir.exists():
        return [Problem(where, f"'{run_dir}' does not exist; give the run folder to continue (it holds job.toml "
                        "and checkpoints/)")]
    if not run_dir.is_dir():
        return [Problem(where, f"'{run_dir}' is a file; give the run folder to continue, not a file in it")]
    folder = RunFolder(run_dir)
    if not folder.job_file.is_file():
        return [Problem(where, f"'{run_dir}' is not a run folder (it has no {JOB_FILE}); give the folder a run "
                        "was started in")]
    problems: list[Problem] = []
    try:
        before = saved_job(run_dir)
    except ConfigError as exc:
        return [Problem(where, f"the run's job file cannot be read: {p}") for p in exc.problems]
    job = job or before
    if folder.lora_path(before.output.name).exists():
        problems.append(Problem(where, f"the run in '{run_dir}' already finished ({before.output.name}.safetensors "
                                "exists); start a new run to train more"))
    latest = latest_checkpoint(folder.checkpoints)
    if latest is None:
        problems.append(Problem(where, f"'{run_dir}' has no complete checkpoint to resume from; start a new run, "
                                "and set output.save_every so a later run can be resumed"))
    refusals, _ = job_changes(before, job)
    problems += refusals
    # Equal is fine: a run that failed while writing its final LoRA resumes to write just that.
    if latest is not None and job.training.epochs == 0 and job.training.steps < _step_of_dir(latest):
        problems.append(Problem("training.steps", f"the last checkpoint is at step {_step_of_dir(latest)}, past the "
                                f"{job.training.steps} steps the job asks for; set more steps to continue"))
    return problems


def writable_problems(job: Job, folder: Path | None = None) -> list[Problem]:
    """Try a real write where the run folder will go (``folder``, or job.output.dir): catches read-only disks,
    which os.access misses (e.g. as root)."""
    from studio.engine.fileio import atomic_write_bytes

    out = folder or (Path(job.output.dir).expanduser() if job.output.dir.strip() else None)
    parent = next((p for p in [out, *out.parents] if p.exists()), None) if out else None
    if parent is None or not parent.is_dir():
        return []  # config.validate reports these
    probe = parent / f".lora-studio-write-test-{os.getpid()}"
    try:
        atomic_write_bytes(probe, b"")
    except OSError as exc:
        return [Problem("output.dir", f"cannot write in '{parent}' ({exc.strerror or exc}); choose a folder you can "
                        "write to")]
    with contextlib.suppress(OSError):
        probe.unlink()
    return []


# ------------------------------------------------------------------------------------------------ metrics


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

            # TensorBoard hides events at or after purge_step: the steps after the checkpoint, which are replayed.
            self._tb = SummaryWriter(log_dir=str(folder.logs), purge_step=start_step + 1 if start_step else None)
        except Exception as exc:  # TensorBoard is optional at run time; metrics.jsonl is the record
            logging.getLogger(__name__).warning("TensorBoard logging off: %s", exc)

    def _truncate_after(self, step: int) -> None:
        from studio.engine.fileio import atomic_write_text

        if not self._path.is_file():
            return
        kept = [line for line in self._path.read_text(encoding="utf-8", errors="replace").splitlines()
                if _step_of(line) <= step]
        # Atomic, so a crash here cannot lose the lines before the checkpoint.
        atomic_write_text(self._path, "".join(line + "\n" for line in kept))

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
        try:
            self.flush()
        finally:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a half-written last line (killed mid-write) is dropped


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list; a half-written line (the run was killed while writing it) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if line.strip():
                out.append(json.loads(line))
    return out


# ------------------------------------------------------------------------------------------------ logging


def attach_log_file(folder: RunFolder) -> logging.Handler:
    """Send the engine's log records to logs/run.log for the length of the run."""
    folder.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("studio").addHandler(handler)
    logging.getLogger("studio").setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("studio").removeHandler(handler)
    handler.close()
