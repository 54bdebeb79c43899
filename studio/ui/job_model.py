"""JobModel: the one owner of the job being edited; widgets bind to it and never hold state of their own."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from studio.engine import config
from studio.engine.config import FieldInfo, Job, Problem


class JobModel(QObject):
    """Owns a :class:`Job`; every change goes through :meth:`set_value` and is announced by ``changed``."""

    changed = Signal(str, object)  # dotted field path, new value
    job_replaced = Signal()  # a whole new job (new, open, preset); ``changed`` was sent for every field too
    problems_changed = Signal(list)  # list[Problem], after every change
    file_changed = Signal(str)  # the job file this job was read from / saved to ("" for none)
    dirty_changed = Signal(bool)  # unsaved edits

    def __init__(self, job: Job | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self._job = job or new_job()
        self._fields: dict[str, FieldInfo] = {info.path: info for info in config.iter_fields()}
        self._problems: list[Problem] = config.validate(self._job)
        self._file = ""
        self._dirty = False
        self._device_type: str | None = None  # what training.device = 'auto' means here, once detected

    # ------------------------------------------------------------------------------------------ reading

    @property
    def job(self) -> Job:
        """The live job; read it, but change it only through :meth:`set_value` so widgets hear about it."""
        return self._job

    def snapshot(self) -> Job:
        """An independent copy, e.g. for the training thread (threads never share the live job)."""
        return copy.deepcopy(self._job)

    def value(self, path: str) -> Any:
        return config.get_value(self._job, path)

    def field(self, path: str) -> FieldInfo:
        return self._fields[path]

    def fields(self) -> list[FieldInfo]:
        return list(self._fields.values())

    @property
    def file_path(self) -> str:
        return self._file

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def name(self) -> str:
        return self._job.output.name

    # ---------------------------------------------------------------------------------------- problems

    def problems(self) -> list[Problem]:
        return list(self._problems)

    def errors(self) -> list[Problem]:
        return config.errors(self._problems)

    def problems_for(self, path: str) -> list[Problem]:
        return [p for p in self._problems if p.field == path]

    # ---------------------------------------------------------------------------------------- writing

    def set_value(self, path: str, value: Any) -> None:
        """Coerce and set one field; raises ValueError (from the job's own rules) when it cannot be read."""
        before = self.value(path)
        config.set_value(self._job, path, value)
        after = self.value(path)
        if after == before and type(after) is type(before):
            return
        self.changed.emit(path, copy.deepcopy(after))
        if path == "output.name" and Path(self._job.output.dir) == default_run_root() / str(before):
            # The default run folder is named after the LoRA; keep them together until the user picks a folder.
            self.set_value("output.dir", str(default_run_root() / str(after)))
        self._set_dirty(True)
        self._revalidate()

    def apply(self, values: dict[str, Any]) -> None:
        """Set several fields at once (a preset); all are checked first so nothing is half-applied."""
        trial = copy.deepcopy(self._job)
        config.apply_overrides(trial, values)  # raises ConfigError listing every bad key
        for path in values:
            self.set_value(path, config.get_value(trial, path))

    def replace(self, job: Job, file_path: str | Path = "") -> None:
        """Swap in a whole job (new or opened); widgets refresh from the ``changed`` signals."""
        self._job = job
        self._file = str(file_path or "")
        self._revalidate(emit=False)
        for path in self._fields:
            self.changed.emit(path, copy.deepcopy(self.value(path)))
        self.file_changed.emit(self._file)
        self._set_dirty(False, force=True)
        self.problems_changed.emit(self.problems())
        self.job_replaced.emit()

    def set_device_type(self, device_type: str | None) -> None:
        """The machine's training device ("cpu", "cuda", "mps"): choices that cannot run on it become problems."""
        if device_type != self._device_type:
            self._device_type = device_type
            self._revalidate()

    def revalidate(self) -> None:
        """Check again, e.g. after a folder appeared on disk."""
        self._revalidate()

    # ---------------------------------------------------------------------------------------- files

    def load(self, path: str | Path) -> None:
        """Open a job file (the same TOML as the CLI); raises config.ConfigError with every problem."""
        self.replace(config.load_job(path), path)

    def save(self, path: str | Path | None = None) -> None:
        target = Path(path or self._file)
        config.save_job(self._job, target)
        self._file = str(target)
        self.file_changed.emit(self._file)
        self._set_dirty(False)

    def to_toml(self) -> str:
        return config.dumps_job(self._job)

    # ---------------------------------------------------------------------------------------- internals

    def _revalidate(self, emit: bool = True) -> None:
        self._problems = config.validate(self._job, device_type=self._device_type)
        if emit:
            self.problems_changed.emit(self.problems())

    def _set_dirty(self, dirty: bool, force: bool = False) -> None:
        if dirty != self._dirty or force:
            self._dirty = dirty
            self.dirty_changed.emit(dirty)


def default_run_root() -> Path:
    from studio.paths import user_data_dir

    return user_data_dir() / "runs"


def new_job() -> Job:
    """A job ready for the window: the demo model with the demo's recipe, a run folder under the user's data folder."""
    from studio.engine.demo import demo_model_settings

    job = Job()
    if job.model.path == config.BUILTIN_DEMO_MODEL:
        config.apply_overrides(job, demo_model_settings())  # the first run in the window learns, as the CLI demo does
    job.output.dir = str(default_run_root() / job.output.name)
    return job
