"""The run folder: never overwritten, with job.toml, metrics.jsonl, samples/, checkpoints/ and logs/; finding runs to resume.

Nothing here imports torch, so the GUI can list unfinished runs and the CLI can check ``--resume`` cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.engine.config import ConfigError, Job, Problem, get_value, iter_fields, load_job, save_job
from studio.engine.jsonfile import JsonFileError, parse_json, read_json_object

METRICS_FILE = "metrics.jsonl"
JOB_FILE = "job.toml"
LOG_FILE = "run.log"
CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"  # small JSON next to each checkpoint's state: step and total without loading tensors
STATE_FILE = "state.pt"
LORA_FILE = "lora.safetensors"
# Written last, once every other file of the checkpoint is on disk: sha256 and size of each. A checkpoint with
# one is complete by construction; resuming verifies every file against it.
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lora-studio.lock"  # held (an OS lock) by the one process training the run
DAMAGED_PREFIX = "damaged-"  # checkpoints a resume found damaged are moved aside under this name, never deleted
# fullmatch everywhere: "$" also matches before a trailing newline, so "step-000004\n" would pass as a checkpoint.
_STEP_DIR = re.compile(r"step-(\d{6,})")
_SAMPLE = re.compile(r"step(\d{6,})_\d+\.png")

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
            m = _SAMPLE.fullmatch(path.name)
            if m and int(m.group(1)) > step:
                removed.append(path)
        prefix = re.compile(rf"{re.escape(name)}-step(\d{{6,}})(?:-diffusers)?\.safetensors")
        for path in self.root.glob(f"{name}-step*.safetensors"):
            m = prefix.fullmatch(path.name)
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

    def intermediate_loras(self, name: str) -> list[tuple[int, Path]]:
        """The run's LoRAs named by step (``<name>-step000040.safetensors``), oldest first; renamed copies are not."""
        pattern = re.compile(rf"{re.escape(name)}-step(\d{{6,}})\.safetensors")
        found = []
        for path in self.root.glob(f"{name}-step*.safetensors") if self.root.is_dir() else []:
            m = pattern.fullmatch(path.name)
            if m and path.is_file():
                found.append((int(m.group(1)), path))
        return sorted(found)

    def prune_intermediate_loras(self, name: str, keep: int) -> list[Path]:
        """Remove all but the newest ``keep`` intermediate LoRAs (0 keeps all); never the final LoRA, never a file
        whose name is not exactly what the run wrote. Returns what was removed."""
        if keep <= 0:
            return []
        removed = []
        for _, path in self.intermediate_loras(name)[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed

    def holds_only_what_a_start_made(self) -> bool:
        """True when the folder has nothing but what setting up a run writes: job.toml, the log, empty folders.

        Anything else (a checkpoint, a sample, a LoRA, a metrics line, a file the user put there) means keep it.
        """
        allowed = {JOB_FILE, LOCK_FILE, "samples", CHECKPOINTS, "logs", METRICS_FILE}
        try:
            for child in self.root.iterdir():
                if child.name not in allowed:
                    return False
                if child.is_dir() and child.name in ("samples", CHECKPOINTS) and any(child.iterdir()):
                    return False
                if child.name == METRICS_FILE and child.stat().st_size:
                    return False
                if child.name == "logs" and any(p.name != LOG_FILE and not p.name.startswith("events.out.tfevents.")
                                                for p in child.iterdir()):
                    return False
        except OSError:
            return False
        return True

    def discard_unused(self, keep_log_in: Path) -> Path | None:
        """Remove the folder of a run that failed before its first step, if it holds only what the start made.

        Its log is moved to ``keep_log_in`` first (the failure message points there). Returns the log's new path,
        or None if the folder was kept.
        """
        if not self.holds_only_what_a_start_made():
            return None
        kept = None
        if self.log_file.is_file():
            keep_log_in.mkdir(parents=True, exist_ok=True)
            kept = keep_log_in / f"{self.root.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            shutil.move(str(self.log_file), kept)
        shutil.rmtree(self.root, ignore_errors=True)
        return kept


# ------------------------------------------------------------------------------------------ one process per run


class RunLock:
    """An OS-level lock on a run folder, held by the one process training it (released when that process ends,
    however it ends, since the system drops the lock with the process)."""

    def __init__(self, root: Path):
        from filelock import FileLock, Timeout

        self.root = Path(root)
        self._lock = FileLock(str(self.root / LOCK_FILE), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            from studio.engine.failures import RunInUse

            raise RunInUse(self.root) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)


def lock_run(root: Path) -> RunLock:
    """Take the run folder's lock or raise failures.RunInUse naming the run."""
    return RunLock(root)


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _step_of_dir(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoints that look complete, oldest first (whether their bytes are intact is checkpoint_problem's job).

    A checkpoint folder appears under its ``step-NNNNNN`` name only by a rename once every file in it is
    written (see state.save_checkpoint); the file check also rejects folders from before that rule.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.fullmatch(child.name)
        if m and (child / STATE_FILE).is_file() and (child / LORA_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that looks complete; resuming uses resume_point, which also checks its files."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_meta(folder: Path) -> dict[str, Any]:
    """The small JSON saved with a checkpoint (step, total_steps, epoch, …); {} for older or damaged ones."""
    try:
        return read_json_object(Path(folder) / META_FILE, max_bytes=1024 * 1024)
    except JsonFileError:
        return {}


# ------------------------------------------------------------------------------------- checkpoint integrity


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, names: list[str]) -> Path:
    """Record size and sha256 of each file (already fsynced) in ``folder/manifest.json``, fsynced too."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}
    path = folder / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's files table; None when the checkpoint has none (saved before checkpoints carried one)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    data = read_json_object(path, what="the checkpoint's checksums", max_bytes=1024 * 1024)
    files = data.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise JsonFileError(f"'{path}' (the checkpoint's checksums) is damaged")
    return files


def checkpoint_problem(folder: Path, *, thorough: bool = True) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or None if it can.

    With a manifest: every file must exist with its recorded size and (``thorough``) its recorded sha256.
    Without one (checkpoints of earlier versions) nothing records what was written, so ``thorough`` checks
    what the formats themselves allow: the safetensors header must describe the file exactly, and state.pt's
    zip archive must be whole with every member matching its CRC-32. The other checks only read sizes.
    """
    folder = Path(folder)
    try:
        files = _manifest(folder)
    except JsonFileError as exc:
        return str(exc)
    if files is None:
        if checkpoint_meta(folder).get("manifest"):
            return f"its {MANIFEST_FILE} is missing, so its files cannot be checked"
        return _legacy_problem(folder) if thorough else None
    for name, entry in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} is {size:,} bytes but {entry['size']:,} were written (cut off or overwritten)"
        if thorough and file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum (its bytes changed after it was saved)"
    for name in (LORA_FILE, STATE_FILE):
        if name not in files:
            return f"{name} is not listed in its {MANIFEST_FILE}"
    return None


def _legacy_problem(folder: Path) -> str | None:
    lora, state = folder / LORA_FILE, folder / STATE_FILE
    problem = _safetensors_layout_problem(lora)
    if problem:
        return f"{LORA_FILE} {problem}"
    try:
        with zipfile.ZipFile(state) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"{STATE_FILE} is cut off or damaged ({exc})"
    if bad is not None:
        return f"{STATE_FILE} is damaged (its part '{bad}' fails its CRC check)"
    return None


def _safetensors_layout_problem(path: Path) -> str | None:
    """A safetensors file whose header does not describe exactly its bytes (torch-free, header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "is empty or cut off"
            (n,) = struct.unpack("<Q", head)
            if n > min(size, 100 * 1024 * 1024):
                return "is cut off or not a safetensors file (its header length is impossible)"
            header = parse_json(fh.read(n), f"the header of '{path}'")
    except (OSError, JsonFileError) as exc:
        return f"cannot be read ({exc})"
    if not isinstance(header, dict):
        return "is damaged (its header is not a table)"
    offsets = [e.get("data_offsets") if isinstance(e, dict) else None for k, e in header.items() if k != "__metadata__"]
    ends = [o[1] for o in offsets if isinstance(o, list) and len(o) == 2]
    if len(ends) != len(offsets) or any(not isinstance(end, int) for end in ends) or 8 + n + max(ends, default=0) != size:
        return f"is {size:,} bytes, which is not what its header describes (cut off or damaged)"
    return None


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint newer than the one a resume uses, and why it was not used."""

    folder: Path
    reason: str


def resume_point(root: Path, *, thorough: bool = True) -> tuple[Path | None, list[SkippedCheckpoint]]:
    """The newest checkpoint that passes checkpoint_problem, and the newer ones that did not (newest first)."""
    skipped = []
    for _, folder in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(folder, thorough=thorough)
        if problem is None:
            return folder, skipped
        skipped.append(SkippedCheckpoint(folder, problem))
    return None, skipped


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint so no resume or pruning ever takes it for a checkpoint; kept for inspection."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    n = 2
    while target.exists():
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{n}")
        n += 1
    os.rename(folder, target)
    return target


def skipped_note(skip: SkippedCheckpoint, used: Path | None, moved_to: Path | None = None) -> str:
    """The sentence that tells a user which checkpoint was skipped, why, and what the resume uses instead."""
    text = f"Checkpoint {skip.folder.name} is damaged: {skip.reason}."
    if used is not None:
        text += f" Resuming from {used.name} (step {_step_of_dir(used)}) instead"
        text += f"; the damaged one was moved to {moved_to}." if moved_to else "."
    return text


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
    latest, _ = resume_point(folder.checkpoints, thorough=False)
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
    "lora.algorithm", "lora.lokr_factor", "lora.lokr_decompose_both", "lora.lokr_full_matrix",
    "lora.train_text_encoder",
    "training.epochs", "training.batch_size", "training.gradient_accumulation", "training.optimizer",
    "training.scheduler", "training.warmup_steps", "training.seed",
    "output.name",
    "validation.split", "validation.folder",  # which images train
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
    latest, _ = resume_point(folder.checkpoints, thorough=False)
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
    # Sizes only here (this runs before every resume, in the GUI too); the trainer verifies the checksums.
    latest, skipped = resume_point(folder.checkpoints, thorough=False)
    if latest is None and skipped:
        problems.append(Problem(where, f"every checkpoint in '{run_dir}' is damaged ("
                                + "; ".join(f"{s.folder.name}: {s.reason}" for s in skipped)
                                + "); start a new run"))
    elif latest is None:
        problems.append(Problem(where, f"'{run_dir}' has no complete checkpoint to resume from; start a new run, "
                                "and set output.save_every so a later run can be resumed"))
    else:
        problems += [Problem(where, skipped_note(s, latest), "warning") for s in skipped]
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
            if "val_loss" in extra:
                self._tb.add_scalar("validation/loss", extra["val_loss"], step)

    def write_validation(self, step: int, val_loss: float, time_s: float) -> None:
        """A line with only the validation loss: the base model's, before the first step (step 0)."""
        self._fh.write(json.dumps({"step": step, "val_loss": val_loss, "time": round(time_s, 4)}) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("validation/loss", val_loss, step)

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
        return int(parse_json(line, METRICS_FILE)["step"])
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
                out.append(parse_json(line, str(path)))
    return out


@dataclass(frozen=True)
class EarlierSample:
    """A preview an earlier part of a run saved in samples/ (what a resumed run shows before its new ones)."""

    step: int
    index: int
    prompt: str
    seed: int | None
    path: Path


_SAMPLE_NAME = re.compile(r"step(\d{6})_(\d{2})\.png")


def earlier_samples(run_dir: Path, up_to_step: int) -> list[EarlierSample]:
    """The previews in ``run_dir/samples`` up to ``up_to_step``, in step and prompt order, with their prompts
    (from the PNG text the sampler writes); files that are not previews or cannot be read are left out."""
    from PIL import Image

    found = []
    folder = Path(run_dir) / "samples"
    for path in sorted(folder.glob("step*_*.png")) if folder.is_dir() else []:
        match = _SAMPLE_NAME.fullmatch(path.name)
        if not match or int(match[1]) > up_to_step:
            continue
        try:
            with Image.open(path) as image:
                text = dict(getattr(image, "text", {}) or {})
        except OSError:
            continue
        seed = text.get("seed", "")
        found.append(EarlierSample(int(match[1]), int(match[2]), text.get("prompt", ""),
                                   int(seed) if seed.isdigit() else None, path))
    return found


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
