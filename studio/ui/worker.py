"""Work off the GUI thread: TrainWorker iterates run_training in a QThread; BackgroundTask runs one function.

Only signals cross threads. Stop and pause are ``threading.Event``s the GUI thread sets directly; the engine
checks them at step boundaries. Nothing here touches a widget.
"""

from __future__ import annotations

import gc
import logging
import threading
import traceback
from typing import Any, Callable, Iterator

from PySide6.QtCore import QObject, QThread, Qt, Signal, Slot

from studio.engine.events import RunFailed, RunStarted, StatusChanged, is_terminal

log = logging.getLogger(__name__)

RunFn = Callable[..., Iterator[object]]

WORK_NICE = 10  # how much lower than the window work threads run (Linux nice steps; see lower_this_threads_priority)


def default_run_fn() -> RunFn:
    from studio.engine.trainer import run_training  # imported late: pulls in torch, and is written separately

    return run_training


def settle_heap() -> None:
    """Take everything alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    A full collection walks every tracked object while holding the GIL: with torch, diffusers and a model loaded
    that is 300-500 thousand objects and 0.5-1 s in which the GUI thread cannot run (measured: the window froze
    for up to 2.6 s at the start and end of a tiny run). What exists once a run is set up (imported modules, the
    model) lives for the whole run; the model is freed by reference counting when the run ends (checked), so
    freezing it leaks nothing big and keeps the window smooth.
    """
    gc.freeze()


def leave_a_core_for_the_window() -> None:
    """Let torch's CPU thread pool use all cores but one, so the GUI thread is never starved of a CPU.

    Only matters when training on the CPU (GPU training keeps one core busy at most); costs a CPU run at most
    1/N of its speed on N cores.
    """
    import os

    import torch

    cores = os.cpu_count() or 1
    if cores > 1 and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)


def lower_this_threads_priority() -> None:
    """Run the calling (work) thread, and the compute threads torch starts from it, below the GUI thread.

    QThread.LowPriority does this on Windows and macOS; on Linux, Qt cannot lower a normal thread's priority,
    but a thread's nice value can be raised (and torch's OpenMP workers, started from this thread afterwards,
    inherit it). Under load the scheduler then serves the window first; alone on the machine, training is as fast.
    Raised from the app's own nice value: an app started with ``nice`` (a CI job, a user's launcher) would
    otherwise get a work thread no lower than its GUI thread.
    """
    import os
    import sys

    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORK_NICE))
        except OSError:  # not allowed in some sandboxes; the window is merely less smooth under load
            pass


def readable_error(exc: object, what: str) -> str:
    """A sentence for people about an exception; the engine's own errors already are one."""
    if isinstance(exc, ImportError):
        return f"{what} is not available in this installation ({exc}). Reinstall or update LoRA Studio."
    if isinstance(exc, MemoryError):
        return f"{what} ran out of memory. Close other programs, or lower the resolution or batch size."
    text = str(exc).strip() or type(exc).__name__
    if type(exc).__module__.startswith("studio."):
        return text[0].upper() + text[1:]
    return f"{what} stopped because of an unexpected error: {text}"


def failure_from_exception(exc: BaseException, what: str) -> RunFailed:
    """A RunFailed for an exception that escaped the engine, so the window reports it like any other failure."""
    return RunFailed(message=readable_error(exc, what), details="".join(traceback.format_exception(exc)))


class TrainWorker(QObject):
    """Lives in a QThread: iterates the run and emits each event; always ends with exactly one terminal event."""

    event_emitted = Signal(object)
    done = Signal()

    def __init__(self, job: Any, run_fn: RunFn | None, stop: threading.Event, pause: threading.Event,
                 resume_dir: Any = None):
        super().__init__()
        self._job = job
        self._resume_dir = resume_dir
        self._run_fn = run_fn
        self._stop = stop
        self._pause = pause

    @Slot()
    def run(self) -> None:
        stream = None
        setting_up = True
        try:
            if self._run_fn is None:
                from studio.ui.backend import warm_up_engine

                warm_up_engine()
                run_fn = default_run_fn()
                leave_a_core_for_the_window()
            else:
                run_fn = self._run_fn
            settle_heap()
            extra = {"resume_dir": self._resume_dir} if self._resume_dir is not None else {}
            stream = run_fn(self._job, self._stop, self._pause, **extra)
            for event in stream:
                self.event_emitted.emit(event)
                if setting_up and isinstance(event, (StatusChanged, RunStarted)):
                    settle_heap()  # each set-up phase (model, caches, LoRA) leaves long-lived objects behind
                    setting_up = not isinstance(event, RunStarted)
                    if not setting_up:
                        # Only now: set-up holds the GIL for long stretches (the tokenizer build, building the
                        # model, injecting the LoRA), and a GIL holder ranked below other programs waits for a core
                        # while the window waits for it (measured: 0.2-1.2 s frozen while loading under load, vs
                        # 0.2-0.3 s at the window's rank; benchmarks/gui_stalls.py --work-nice).
                        lower_this_threads_priority()
                if is_terminal(event):
                    break
            else:
                self.event_emitted.emit(RunFailed(
                    "The training run ended without saying whether it finished. Check the log, then try again."))
        except Exception as exc:  # the window must survive anything the engine throws
            log.exception("training run raised")
            self.event_emitted.emit(failure_from_exception(exc, "Training"))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                try:
                    close()  # runs the engine's cleanup (frees the model) now, on this thread
                except Exception:
                    log.exception("closing the training run failed")
            self.done.emit()


class TrainController(QObject):
    """Starts, pauses, resumes and stops one training run; re-emits its events on the GUI thread."""

    event_received = Signal(object)
    running_changed = Signal(bool)

    def __init__(self, run_fn: RunFn | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.run_fn = run_fn
        self._thread: QThread | None = None
        self._worker: TrainWorker | None = None
        self._stop = threading.Event()
        self._pause = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def stopping(self) -> bool:
        return self.running and self._stop.is_set()

    def start(self, job: Any, resume_dir: Any = None) -> None:
        """Train ``job``; with ``resume_dir``, continue that unfinished run from its latest checkpoint."""
        if self.running:
            raise RuntimeError("a run is already going")
        self._stop = threading.Event()
        self._pause = threading.Event()
        thread = QThread()
        thread.setObjectName("training")
        worker = TrainWorker(job, self.run_fn, self._stop, self._pause, resume_dir)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.event_emitted.connect(self._on_event)
        # Direct: quit() is thread-safe, and a queued call would wait for the GUI thread, which may itself be
        # waiting for this thread (shutdown) — a deadlock.
        worker.done.connect(thread.quit, Qt.DirectConnection)
        thread.finished.connect(self._on_thread_finished)
        self._thread, self._worker = thread, worker
        thread.start(QThread.LowPriority)  # the window comes first; see lower_this_threads_priority
        self.running_changed.emit(True)

    @property
    def paused(self) -> bool:
        """Pause was asked for (the run may still be finishing its step)."""
        return self.running and self._pause.is_set()

    def pause(self) -> None:
        if self.running:
            self._pause.set()  # the run says "Paused" (StatusChanged) once it has reached a step boundary

    def resume(self) -> None:
        self._pause.clear()

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary (it saves a usable LoRA and ends with RunCancelled)."""
        if self.running:
            self._stop.set()
            self.resume()  # a paused run must wake up to notice the stop

    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Stop and wait for the thread (closing the window); True when it ended in time."""
        thread = self._thread
        if thread is None:
            return True
        self.stop()
        ended = thread.wait(timeout_ms)
        if ended:
            self._on_thread_finished()
        return ended

    @Slot(object)
    def _on_event(self, event: object) -> None:
        self.event_received.emit(event)

    @Slot()
    def _on_thread_finished(self) -> None:
        if self._thread is None:
            return
        self._worker.deleteLater()
        self._thread.deleteLater()
        self._thread = self._worker = None
        self.running_changed.emit(False)


# ------------------------------------------------------------------------------------------- one function


class _FunctionWorker(QObject):
    succeeded = Signal(object)
    failed = Signal(object)  # the exception
    progressed = Signal(object)
    done = Signal()

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, engine: bool):
        super().__init__()
        self._fn, self._args, self._kwargs, self._engine = fn, args, kwargs, engine

    @Slot()
    def run(self) -> None:
        try:
            if self._engine:
                from studio.ui.backend import warm_up_engine

                warm_up_engine()
            result = self._fn(*self._args, **self._kwargs)
            if self._engine:
                settle_heap()  # what it imported and loaded (torch, a model) stays; see settle_heap
        except Exception as exc:
            log.debug("background task failed", exc_info=True)
            self.failed.emit(exc)
        else:
            self.succeeded.emit(result)
        finally:
            self.done.emit()


class BackgroundTask(QObject):
    """``fn(*args, **kwargs)`` in its own QThread; its signals arrive on the GUI thread.

    With ``progress=True`` the function gets a ``progress`` callback (any object; it is passed on), with
    ``stoppable=True`` a ``stop`` threading.Event that :meth:`cancel` sets. ``engine=True`` is for functions that
    use the engine's heavy libraries or load a model: they are imported safely first (backend.warm_up_engine)
    and what stays loaded is kept out of the garbage collector's way afterwards (:func:`settle_heap`).
    """

    succeeded = Signal(object)
    failed = Signal(str, str)  # message for people, technical details
    progressed = Signal(object)
    finished = Signal()

    def __init__(self, fn: Callable[..., Any], *args: Any, progress: bool = False, stoppable: bool = False,
                 engine: bool = False, what: str = "This task", parent: QObject | None = None, **kwargs: Any):
        super().__init__(parent)
        self.what = what
        self.cancelled = False
        self._stop = threading.Event()
        self._thread: QThread | None = QThread()
        self._thread.setObjectName(what)
        if stoppable:
            kwargs["stop"] = self._stop
        self._worker = _FunctionWorker(fn, args, kwargs, engine)
        if progress:
            kwargs["progress"] = self._worker.progressed.emit
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.run)
        self._worker.succeeded.connect(self._on_succeeded)
        self._worker.failed.connect(self._on_failed)
        self._worker.progressed.connect(self._on_progress)
        self._worker.done.connect(self._thread.quit, Qt.DirectConnection)  # see TrainController.start
        self._thread.finished.connect(self._on_thread_finished)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "BackgroundTask":
        assert self._thread is not None
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Drop the result and ask the function to stop (when it takes a ``stop`` event)."""
        self.cancelled = True
        self._stop.set()

    def wait(self, timeout_ms: int = 60_000) -> bool:
        thread = self._thread
        if thread is None:
            return True
        ended = thread.wait(timeout_ms)
        if ended:
            self._on_thread_finished()
        return ended

    @Slot(object)
    def _on_succeeded(self, result: object) -> None:
        if not self.cancelled:
            self.succeeded.emit(result)

    @Slot(object)
    def _on_failed(self, exc: object) -> None:
        if self.cancelled:
            return
        details = "".join(traceback.format_exception(exc)) if isinstance(exc, BaseException) else str(exc)
        self.failed.emit(readable_error(exc, self.what), details)

    @Slot(object)
    def _on_progress(self, value: object) -> None:
        if not self.cancelled:
            self.progressed.emit(value)

    @Slot()
    def _on_thread_finished(self) -> None:
        if self._thread is None:
            return
        self._worker.deleteLater()
        self._thread.deleteLater()
        self._thread = None
        self.finished.emit()


class TaskRunner(QObject):
    """Keeps the background tasks of one part of the window; one task per key (a new one replaces the old)."""

    busy_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._tasks: dict[str, BackgroundTask] = {}
        self._finishing: set[BackgroundTask] = set()
        self._closed = False  # after shutdown nothing new starts (a timer may still fire while closing)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def is_running(self, key: str) -> bool:
        return key in self._tasks

    def run(self, key: str, fn: Callable[..., Any], *args: Any,
            on_done: Callable[[Any], None] | None = None,
            on_error: Callable[[str, str], None] | None = None,
            on_progress: Callable[[Any], None] | None = None,
            on_finished: Callable[[], None] | None = None,
            **kwargs: Any) -> BackgroundTask | None:
        if self._closed:
            return None
        self.cancel(key)
        was_busy = self.busy
        task = BackgroundTask(fn, *args, parent=self, **kwargs)
        if on_done:
            task.succeeded.connect(on_done)
        if on_error:
            task.failed.connect(on_error)
        if on_progress:
            task.progressed.connect(on_progress)
        task.finished.connect(lambda: self._forget(key, task))
        if on_finished:
            task.finished.connect(on_finished)
        self._tasks[key] = task
        task.start()
        if not was_busy:
            self.busy_changed.emit(True)
        return task

    def cancel(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
            self._finishing.add(task)  # keep it alive until its thread has ended
            if not self._tasks:
                self.busy_changed.emit(False)

    def shutdown(self, timeout_ms: int = 60_000) -> None:
        """Cancel everything and wait for the threads (window closing, tests ending)."""
        self._closed = True
        for key in list(self._tasks):
            self.cancel(key)
        for task in list(self._finishing):
            task.wait(timeout_ms)

    def _forget(self, key: str, task: BackgroundTask) -> None:
        self._finishing.discard(task)
        if self._tasks.get(key) is task:
            del self._tasks[key]
            if not self._tasks:
                self.busy_changed.emit(False)
        task.deleteLater()
