"""Scripted stand-ins for run_training: lists of events, and a stepping run that honours stop and pause."""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QWidget

from studio.engine.events import (
    RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged, StepCompleted,
)


def scripted_run(events: Iterable[object], delay: float = 0.0):
    """A run_training that yields exactly ``events`` (a callable instead of an event raises it)."""
    events = list(events)

    def run(job, stop=None, pause=None):
        for event in events:
            if delay:
                time.sleep(delay)
            if callable(event) and not hasattr(event, "__dataclass_fields__"):
                event()
            else:
                yield event

    return run


def write_lora_stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a lora")
    return path


def stepping_run(run_dir: Path, total: int = 20, delay: float = 0.005, sample_every: int = 0,
                 raise_at: int | None = None, fail_at: int | None = None, image_size: int = 32):
    """A fake trainer with the real one's contract: stop/pause at step boundaries, one terminal event."""

    def run(job, stop: threading.Event | None = None, pause: threading.Event | None = None):
        stop = stop or threading.Event()
        pause = pause or threading.Event()
        from PIL import Image

        run_dir.mkdir(parents=True, exist_ok=True)
        yield StatusChanged("Loading model", "fake")
        yield RunStarted(run_dir, total, "sd1", "CPU (fake)", 4, 0, job)
        started = time.monotonic()
        for step in range(1, total + 1):
            if pause.is_set() and not stop.is_set():
                yield StatusChanged("Paused", f"at step {step - 1}; the model stays loaded")
                while pause.is_set() and not stop.is_set():
                    time.sleep(0.005)
                yield StatusChanged("Training", "resumed")
            if stop.is_set():
                lora = write_lora_stub(run_dir / f"fake-step{step - 1:06d}.safetensors") if step > 1 else None
                yield RunCancelled(step - 1, run_dir, lora)
                return
            time.sleep(delay)
            if raise_at == step:
                raise RuntimeError("simulated crash inside the engine")
            if fail_at == step:
                yield RunFailed("The GPU ran out of memory. Lower the batch size.", "Traceback: fake OOM", run_dir)
                return
            elapsed = time.monotonic() - started
            yield StepCompleted(step, total, 1.0 / math.sqrt(step), 1e-4, elapsed, step / max(elapsed, 1e-6),
                                (total - step) * elapsed / step)
            if sample_every and step % sample_every == 0:
                image = Image.new("RGB", (image_size, image_size), (step * 10 % 255, 80, 160))
                yield SampleReady(step, 0, "a red circle", 1234, run_dir / f"step{step:06d}_00.png", image)
        lora = write_lora_stub(run_dir / "fake.safetensors")
        yield RunFinished(run_dir, lora, total, time.monotonic() - started)

    return run


def drop_paths(widget: QWidget, *paths: Path) -> None:
    """Drag local paths over ``widget`` and drop them, through real Qt drag-and-drop events."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    with warnings.catch_warnings():  # PySide marks the only QDragEnterEvent constructor deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(pos.toPoint(), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted(), "the widget did not accept the drag"
    drop = QDropEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, drop)
