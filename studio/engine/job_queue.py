"""The job queue: job files to train one after another, kept in a small JSON file written atomically (no Qt)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.engine.fileio import atomic_write_text
from studio.engine.jsonfile import JsonFileError, read_json_object

QUEUE_VERSION = 1
STATES = ("waiting", "running", "finished", "failed", "stopped")


@dataclass
class QueuedJob:
    job_file: str  # the job's TOML (the same file `lora-studio train` reads)
    name: str = ""
    state: str = "waiting"
    run_dir: str = ""  # where it trained, once it has; Try & Export opens that run
    message: str = ""  # why it failed, for people


@dataclass
class JobQueue:
    """Entries in the order they run; every change is saved at once by the owner calling :meth:`save`."""

    path: Path
    entries: list[QueuedJob] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "JobQueue":
        """The queue in ``path`` (empty when there is none); a damaged file raises JsonFileError naming it.

        A job that was running when the app ended is waiting again: its run folder can be resumed or it reruns.
        """
        path = Path(path)
        if not path.is_file():
            return cls(path)
        data = read_json_object(path, what="the job queue")
        entries = []
        for raw in data.get("jobs", []):
            if not isinstance(raw, dict) or not isinstance(raw.get("job_file"), str):
                raise JsonFileError(f"{path} has an entry without a job file; remove the file to start an empty queue")
            entry = QueuedJob(**{k: str(raw.get(k, "")) for k in ("job_file", "name", "run_dir", "message")},
                              state=raw.get("state") if raw.get("state") in STATES else "waiting")
            if entry.state == "running":
                entry.state = "waiting"
            entries.append(entry)
        return cls(path, entries)

    def save(self) -> None:
        text = json.dumps({"version": QUEUE_VERSION, "jobs": [asdict(e) for e in self.entries]}, indent=1)
        atomic_write_text(self.path, text + "\n")

    def add(self, job_file: str | Path, name: str = "") -> QueuedJob:
        entry = QueuedJob(str(job_file), name or Path(job_file).stem)
        self.entries.append(entry)
        return entry

    def remove(self, index: int) -> QueuedJob:
        return self.entries.pop(index)

    def move(self, index: int, to: int) -> None:
        """Move entry ``index`` to position ``to`` (clamped to the queue)."""
        entry = self.entries.pop(index)
        self.entries.insert(max(0, min(to, len(self.entries))), entry)

    def next_waiting(self) -> QueuedJob | None:
        return next((e for e in self.entries if e.state == "waiting"), None)
