"""MainWindow: the step rail, the five pages, the status bar, menus and shortcuts; the one event dispatch."""

from __future__ import annotations

import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QEvent, QSize, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication, QDialog, QDialogButtonBox, QFileDialog, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
    QMainWindow, QMessageBox, QStackedWidget, QTextBrowser, QVBoxLayout, QWidget,
)

from studio import app_info
from studio.engine import config
from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
    StepCompleted, ValidationCompleted,
)
from studio.ui import backend, settings_store, theme
from studio.ui.images import pil_to_pixmap
from studio.ui.job_model import JobModel, new_job
from studio.ui.pages.base import ATTENTION, DONE, RUNNING, Page
from studio.ui.pages.dataset_page import DatasetPage
from studio.ui.pages.export_page import TryExportPage
from studio.ui.pages.model_page import ModelPage
from studio.ui.pages.settings_page import SettingsPage
from studio.ui.pages.train_page import TrainPage
from studio.ui.widgets.drop_zone import local_paths
from studio.ui.widgets.queue_panel import QueuePanel
from studio.ui.worker import RunFn, TaskRunner, TrainController

log = logging.getLogger(__name__)

PAGES = ("model", "dataset", "settings", "train", "export")
RAIL_NAMES = {"model": "Model", "dataset": "Dataset", "settings": "Settings", "train": "Train", "export": "Try & Export"}
STATE_ICONS = {DONE: "state-done", ATTENTION: "state-attention", RUNNING: "state-running"}
RUN_STATE_TEXT = {"idle": "Not started", "starting": "Starting…", "running": "Training", "pausing": "Pausing…",
                  "paused": "Paused",
                  "stopping": "Stopping…", "finished": "Finished", "failed": "Failed", "cancelled": "Stopped"}


class MainWindow(QMainWindow):
    """One window; ``run_fn`` replaces the trainer (tests pass scripted event streams)."""

    def __init__(self, run_fn: RunFn | None = None, *, restore: bool = True, detect_device: bool = True):
        super().__init__()
        self.setWindowTitle(app_info.APP_NAME)
        self.setWindowIcon(theme.icon("app"))
        self.model = JobModel(parent=self)
        self.tasks = TaskRunner(self)
        self.controller = TrainController(run_fn, self)
        self.controller.event_received.connect(self.on_event)
        self.controller.running_changed.connect(self._on_running_changed)
        self.unknown_events: list[object] = []
        self._close_when_stopped = False

        self.model_page = ModelPage(self.model, self.tasks)
        self.dataset_page = DatasetPage(self.model, self.tasks)
        self.settings_page = SettingsPage(self.model, self.tasks)
        self.train_page = TrainPage(self.model, tasks=self.tasks)
        self.export_page = TryExportPage(self.model, self.tasks)
        self.pages: dict[str, Page] = {
            "model": self.model_page, "dataset": self.dataset_page, "settings": self.settings_page,
            "train": self.train_page, "export": self.export_page,
        }

        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        self.rail = QListWidget()
        self.rail.setObjectName("stepRail")
        self.rail.setFocusPolicy(Qt.StrongFocus)
        self.rail.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.rail.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.stack = QStackedWidget()
        for key, page in self.pages.items():
            item = QListWidgetItem(RAIL_NAMES[key])
            item.setData(Qt.UserRole, key)
            self.rail.addItem(item)
            self.stack.addWidget(page)
            page.state_changed.connect(self.refresh_rail)
        self.rail.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.rail.currentRowChanged.connect(lambda _: self._update_status())
        row.addWidget(self.rail)
        row.addWidget(self.stack, 1)
        self.setCentralWidget(central)
        self._size_rail()

        # Status bar: device · job · run state.
        self.device_label = QLabel("Device: …")
        self.job_label = QLabel()
        self.run_label = QLabel()
        for w in (self.device_label, self.job_label, self.run_label):
            w.setObjectName("statusItem")
        self.statusBar().addWidget(self.device_label)
        self.statusBar().addWidget(self.job_label, 1)
        self.statusBar().addPermanentWidget(self.run_label)

        self._make_queue()
        self._make_actions()
        self.train_page.start_requested.connect(self.start_training)
        self.train_page.pause_requested.connect(self.pause_training)
        self.train_page.resume_requested.connect(self.resume_training)
        self.train_page.stop_requested.connect(self.request_stop)
        self.train_page.go_to_page.connect(self.go_to)
        self.train_page.try_requested.connect(lambda: self.go_to("export"))
        self.train_page.resume_run_requested.connect(self.resume_run)
        self.train_page.lora_rescued.connect(self.export_page.set_run)
        self.model.problems_changed.connect(lambda _: self.refresh_rail())
        self.model.file_changed.connect(lambda _: self._update_status())
        self.model.dirty_changed.connect(lambda _: self._update_status())
        self.model.changed.connect(self._on_model_changed)

        self.setAcceptDrops(True)  # a job file dropped anywhere outside the pages' own drop areas opens it
        if restore:
            self.restore_state()
            self.look_for_unfinished_runs()
        self.rail.setCurrentRow(0)
        self.refresh_rail()
        self._update_status()
        if detect_device:
            self.tasks.run("device", backend.detect_device, what="Detecting the device",
                           on_done=lambda d: self.device_label.setText(f"Device: {d}"),
                           on_error=lambda m, d: self.device_label.setText("Device: unknown"))
            self.tasks.run("device-type", backend.detect_device_type, what="Detecting the device",
                           on_done=self.model.set_device_type)
        else:
            self.device_label.setText("Device: CPU")
        QApplication.styleHints().colorSchemeChanged.connect(self._on_scheme_changed)

    # ----------------------------------------------------------------------------------------- layout

    def _size_rail(self) -> None:
        self.rail.ensurePolished()  # the style sheet sets the rail's font; measure with that one
        em = self.rail.fontMetrics().height()
        self.rail.setIconSize(QSize(em, em))
        widest = max(self.rail.fontMetrics().horizontalAdvance(self.rail.item(i).text()) for i in range(self.rail.count()))
        self.rail.setFixedWidth(widest + em * 5)

    def current_page(self) -> str:
        return PAGES[self.stack.currentIndex()]

    def go_to(self, key: str) -> None:
        self.rail.setCurrentRow(PAGES.index(key))

    def refresh_rail(self) -> None:
        for i, key in enumerate(PAGES):
            state, why = self.pages[key].state()
            item = self.rail.item(i)
            item.setIcon(theme.icon(STATE_ICONS.get(state, "state-pending")))
            item.setToolTip(why)
            item.setData(Qt.UserRole + 1, state)
        self._update_status()

    def rail_state(self, key: str) -> str:
        return self.rail.item(PAGES.index(key)).data(Qt.UserRole + 1)

    def _update_status(self) -> None:
        name = self.model.name
        file = Path(self.model.file_path).name if self.model.file_path else "not saved"
        dirty = " (changed)" if self.model.dirty and self.model.file_path else ""
        self.job_label.setText(f"Job: {name} — {file}{dirty}")
        state = self.train_page.run_state
        text = RUN_STATE_TEXT.get(state, state)
        if state in ("running", "pausing", "paused") and self.train_page.total_steps:
            text += f" — step {self.train_page.step} / {self.train_page.total_steps}"
        self.run_label.setText(text)
        self.setWindowTitle(f"{name}{' •' if self.model.dirty else ''} — {app_info.APP_NAME}")

    # ----------------------------------------------------------------------------------------- actions

    def _make_actions(self) -> None:
        def action(text: str, slot, shortcut=None, icon: str | None = None) -> QAction:
            a = QAction(text, self)
            if icon:
                a.setIcon(theme.icon(icon))
            if shortcut is not None:
                a.setShortcut(QKeySequence(shortcut))
                a.setShortcutContext(Qt.WindowShortcut)
            a.triggered.connect(slot)
            self.addAction(a)
            return a

        self.new_action = action("&New job", self.new_job, QKeySequence.New)
        self.open_action = action("&Open job…", self.open_job, QKeySequence.Open, "folder")
        self.save_action = action("&Save job", self.save_job, QKeySequence.Save, "save")
        self.save_as_action = action("Save job &as…", self.save_job_as, QKeySequence.SaveAs)
        self.quit_action = action("&Quit", self.close, QKeySequence.Quit)
        self.start_action = action("&Start training", self.start_training, QKeySequence("Ctrl+Return"), "start")
        self.stop_action = action("S&top training…", self.request_stop, QKeySequence(Qt.Key_Escape), "stop")
        self.help_action = action("&Help for this page", self.show_help, QKeySequence.HelpContents, "help")
        self.about_action = action(f"&About {app_info.APP_NAME}", self.show_about)
        # Ctrl+Enter on the keypad too.
        self.start_action.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        if self.help_action.shortcut().isEmpty():
            self.help_action.setShortcut(QKeySequence(Qt.Key_F1))

        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        for a in (self.new_action, self.open_action, self.save_action, self.save_as_action):
            file_menu.addAction(a)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)
        run_menu = bar.addMenu("&Run")
        run_menu.addAction(self.start_action)
        run_menu.addAction(self.stop_action)
        run_menu.addSeparator()
        # The queue dock starts hidden while the queue is empty: these reach it from any page.
        self.queue_add_action = action("&Add job to queue", self.add_to_queue, QKeySequence("Ctrl+Shift+Q"))
        run_menu.addAction(self.queue_add_action)
        self.queue_show_action = self.queue_dock.toggleViewAction()
        self.queue_show_action.setText("Show job &queue")
        run_menu.addAction(self.queue_show_action)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.help_action)
        help_menu.addAction(self.about_action)

    # ------------------------------------------------------------------------------------------ jobs

    def new_job(self) -> None:
        if not self._may_discard():
            return
        self.model.replace(new_job())

    def open_job(self, path: str | None = None) -> bool:
        if not path:
            if not self._may_discard():
                return False
            path, _ = QFileDialog.getOpenFileName(self, "Open a job", self._job_folder(), "Jobs (*.toml);;All files (*)")
            if not path:
                return False
        try:
            self.model.load(path)
        except config.ConfigError as exc:
            problems = "".join(f"<li>{p}</li>" for p in exc.problems)
            QMessageBox.warning(self, "This job cannot be opened",
                                f"<p>{Path(path).name} has {len(exc.problems)} problem(s):</p><ul>{problems}</ul>"
                                "<p>Fix them in a text editor, or start a new job.</p>")
            return False
        settings_store.push_recent("jobs/recent", str(path))
        return True

    def save_job(self) -> bool:
        if not self.model.file_path:
            return self.save_job_as()
        return self._save_to(self.model.file_path)

    def save_job_as(self) -> bool:
        suggested = str(Path(self._job_folder()) / f"{self.model.name}.toml")
        path, _ = QFileDialog.getSaveFileName(self, "Save the job", suggested, "Jobs (*.toml)")
        if not path:
            return False
        if not path.endswith(".toml"):
            path += ".toml"
        return self._save_to(path)

    def _save_to(self, path: str) -> bool:
        try:
            self.model.save(path)
        except OSError as exc:
            QMessageBox.warning(self, "The job was not saved", f"{path} could not be written: {exc.strerror or exc}.")
            return False
        settings_store.push_recent("jobs/recent", path)
        self.statusBar().showMessage(f"Saved {path}", 4000)
        return True

    def _job_folder(self) -> str:
        return str(Path(self.model.file_path).parent) if self.model.file_path else str(Path.home())

    def _may_discard(self) -> bool:
        """Unsaved edits of a job that came from a file: ask before they are lost."""
        if not (self.model.dirty and self.model.file_path):
            return True
        answer = QMessageBox.question(
            self, "Save changes?", f"Save the changes to {Path(self.model.file_path).name} first?",
            QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, QMessageBox.Save)
        if answer == QMessageBox.Save:
            return self.save_job()
        return answer == QMessageBox.Discard

    def _on_model_changed(self, path: str, value: Any) -> None:
        if path == "output.name":
            self._update_status()

    def dragEnterEvent(self, event) -> None:
        paths = local_paths(event)
        if len(paths) == 1 and paths[0].suffix.lower() == ".toml":
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = local_paths(event)
        if len(paths) == 1 and paths[0].suffix.lower() == ".toml" and self._may_discard():
            event.acceptProposedAction()
            self.open_job(str(paths[0]))

    # ------------------------------------------------------------------------------------------ training

    def start_training(self) -> None:
        if self.controller.running:
            return
        if self.model.errors():
            self.go_to("train")  # the checklist there says what is missing
            self.train_page.checklist_card.show()
            return
        self.go_to("train")
        self.train_page.run_starting()
        self.controller.start(self.model.snapshot())
        self.refresh_rail()

    def look_for_unfinished_runs(self) -> None:
        """Off the GUI thread: an earlier run next to this job's run folder that can be resumed."""
        if self.controller.running:
            return
        self.tasks.run("unfinished", backend.find_unfinished_runs, self.model.snapshot(),
                       on_done=lambda runs: self.train_page.offer_resume(runs[0] if runs else None),
                       on_error=lambda m, d: log.warning("looking for unfinished runs failed: %s", m))

    def resume_run(self, run) -> None:
        """Continue an unfinished run with the job it was started with, in its own folder."""
        if self.controller.running or run is None or not self._may_discard():
            return
        self.model.replace(run.job, "")
        self.go_to("train")
        self.train_page.run_starting()
        self.controller.start(run.job, resume_dir=run.run_dir)
        self.refresh_rail()

    def pause_training(self) -> None:
        self.controller.pause()  # the Event is set here, on the click; the engine checks it after the step in flight
        self.train_page.pausing()

    def resume_training(self) -> None:
        self.controller.resume()
        self.train_page.resuming()

    def request_stop(self) -> None:
        """Esc and the Stop button: ask first, because a stopped run cannot be continued from here.

        While the question is open the run holds at the end of the step in flight (a pause), so the stop lands
        where the user clicked rather than however many steps later the question is answered.
        """
        if not self.controller.running or self.controller.stopping:
            return
        held = not self.controller.paused
        if held:
            self.controller.pause()
        if self.confirm("Stop training?", "Stop at the end of this step? The LoRA of the steps done so far is kept, and the run can be resumed later."):
            self.stop_training()
        elif held:
            self.controller.resume()

    def stop_training(self) -> None:
        self.controller.stop()
        self.train_page.stopping()

    def confirm(self, title: str, text: str) -> bool:
        answer = QMessageBox.question(self, title, text, QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _on_running_changed(self, running: bool) -> None:
        self.start_action.setEnabled(not running)
        self.stop_action.setEnabled(running)
        if not running and self.queue_running and not self._close_when_stopped:
            QTimer.singleShot(0, self, self._start_next_queued)  # the next queued job, now this thread has ended
        if not running and self._close_when_stopped:
            QTimer.singleShot(0, self.close)
        elif not running:
            self.look_for_unfinished_runs()  # a stopped or failed run can be continued
        if not running and self.train_page.busy:
            # The thread ended without a terminal event reaching us (it always sends one; belt and braces).
            self.train_page.set_run_state("failed")
        self.refresh_rail()

    def on_event(self, event: object) -> None:
        """The one place that reacts to training events."""
        page = self.train_page
        match event:
            case RunStarted():
                page.on_run_started(event)
            case StatusChanged():
                page.on_status(event)
            case StepCompleted():
                page.on_step(event)
            case ValidationCompleted():
                page.on_validation(event)
            case SampleReady():
                pixmap = pil_to_pixmap(event.image) if event.image is not None else None  # GUI thread only
                page.on_sample(event, pixmap)
            case CheckpointSaved():
                page.on_checkpoint(event)
            case LogMessage():
                page.on_log(event)
            case RunFinished():
                page.on_finished(event)
                self.export_page.set_run(event.run_dir, event.lora_path, best_step=event.best_step,
                                         final_step=event.steps)
                self._queued_run_ended("finished", event.run_dir)
            case RunFailed():
                page.on_failed(event)
                self._queued_run_ended("failed", event.run_dir, event.message)
                if event.lora_path:
                    self.export_page.set_run(event.run_dir, event.lora_path)
            case RunCancelled():
                page.on_cancelled(event)
                self._queued_run_ended("stopped", event.run_dir)
                if event.lora_path:
                    self.export_page.set_run(event.run_dir, event.lora_path)

            case _:
                log.warning("unknown training event: %r", event)
                self.unknown_events.append(event)
                page.log("warning", f"Unknown event from the engine: {type(event).__name__}")
        self._update_status()

    # ------------------------------------------------------------------------------------------ queue

    def _make_queue(self) -> None:
        """The job queue, a dock beside the pages; its file lives in the app's data folder and survives a restart."""
        from PySide6.QtWidgets import QDockWidget

        from studio.engine.job_queue import JobQueue
        from studio.engine.jsonfile import JsonFileError
        from studio.paths import queue_file

        try:
            queue = JobQueue.load(queue_file())
        except JsonFileError as exc:
            log.warning("the job queue was not restored: %s", exc)
            queue = JobQueue(queue_file())
        self.queue_running = False
        self._queue_entry = None
        self.queue_panel = QueuePanel(queue)
        self.queue_panel.add_requested.connect(self.add_to_queue)
        self.queue_panel.run_requested.connect(self.run_queue)
        self.queue_panel.open_run_requested.connect(self.open_queued_run)
        self.queue_dock = QDockWidget("Job queue", self)
        self.queue_dock.setObjectName("queueDock")
        self.queue_dock.setWidget(self.queue_panel)
        self.addDockWidget(Qt.RightDockWidgetArea, self.queue_dock)
        self.queue_dock.setVisible(bool(queue.entries))

    def add_to_queue(self) -> None:
        """The current job, as a job file of its own (the same TOML the CLI's queue takes)."""
        from studio.paths import user_data_dir

        queue = self.queue_panel.queue
        folder = user_data_dir() / "queue"
        n = len(queue.entries) + 1
        while (folder / f"{self.model.name}-{n}.toml").exists():
            n += 1
        path = folder / f"{self.model.name}-{n}.toml"
        config.save_job(self.model.snapshot(), path)
        queue.add(path, self.model.name)
        queue.save()
        self.queue_panel.refresh()
        self.queue_dock.show()

    def run_queue(self) -> None:
        if self.controller.running:
            return
        self.queue_running = True
        self._start_next_queued()

    def _start_next_queued(self) -> None:
        queue = self.queue_panel.queue
        entry = queue.next_waiting()
        if entry is None or not self.queue_running or self.controller.running:
            self.queue_running = self.queue_running and entry is not None
            self.queue_panel.refresh()
            return
        try:
            job = config.load_job(entry.job_file)
        except (config.ConfigError, OSError) as exc:
            entry.state, entry.message = "failed", str(exc)
            queue.save()
            self._start_next_queued()
            return
        self.model.replace(job, entry.job_file)
        if self.model.errors():
            entry.state, entry.message = "failed", "; ".join(str(p) for p in self.model.errors())
            queue.save()
            self._start_next_queued()
            return
        entry.state = "running"
        queue.save()
        self._queue_entry = entry
        self.queue_panel.refresh()
        self.go_to("train")
        self.train_page.run_starting()
        self.controller.start(self.model.snapshot())

    def _queued_run_ended(self, state: str, run_dir: Any, message: str = "") -> None:
        entry, self._queue_entry = self._queue_entry, None
        if entry is None:
            return
        entry.state, entry.run_dir, entry.message = state, str(run_dir or ""), message
        self.queue_panel.queue.save()
        self.queue_panel.refresh()
        if state == "stopped":
            self.queue_running = False  # Stop ends the queue, not only the job

    def open_queued_run(self, entry) -> None:
        """A finished job, one click from Try & Export."""
        self.export_page.set_run(Path(entry.run_dir))
        self.go_to("export")

    # ------------------------------------------------------------------------------------------ help

    def show_help(self) -> None:
        page = self.pages[self.current_page()]
        dialog = QDialog(self)
        dialog.setWindowTitle(f"Help — {page.title}")
        layout = QVBoxLayout(dialog)
        text = QTextBrowser()
        text.setOpenExternalLinks(True)
        text.setHtml(f"<h2>{page.title}</h2>{page.help_html}<p>{_GENERAL_HELP}</p>")
        layout.addWidget(text)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(dialog.reject)
        layout.addWidget(buttons)
        em = theme.em(self)
        dialog.resize(em * 36, em * 26)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.open()

    def show_about(self) -> None:
        QMessageBox.about(self, f"About {app_info.APP_NAME}", about_html())

    # ------------------------------------------------------------------------------------------ state

    def restore_state(self) -> None:
        s = settings_store.app_settings()
        geometry = s.value("window/geometry")
        if isinstance(geometry, (QByteArray, bytes)):
            self.restoreGeometry(geometry)
        else:
            em = theme.em(self)
            self.resize(em * 72, em * 46)
        text = s.value("job/toml", "")
        path = s.value("job/path", "")
        if text:
            try:
                import tomllib

                job = config.job_from_dict(tomllib.loads(str(text)), "the last job")
            except (config.ConfigError, ValueError) as exc:
                log.warning("last job not restored: %s", exc)
            else:
                self.model.replace(job, path if path and Path(path).is_file() else "")
                if s.value("job/dirty", False) in (True, "true"):
                    self.model._set_dirty(True)
        page = s.value("window/page", "")
        if page in PAGES:
            QTimer.singleShot(0, self, lambda: self.go_to(page))

    def save_state(self) -> None:
        s = settings_store.app_settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/page", self.current_page())
        s.setValue("job/toml", self.model.to_toml())
        s.setValue("job/path", self.model.file_path)
        s.setValue("job/dirty", self.model.dirty)
        s.sync()

    def shutdown(self) -> None:
        """Stop the run and every background task, waiting for their threads."""
        self.controller.shutdown()
        self.tasks.shutdown()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.controller.running:
            # Never block the GUI thread waiting for a run: ask it to stop, close when it has.
            if not self.controller.stopping and not self.confirm(
                    "Quit while training?",
                    "A run is still going. Stop it (keeping the LoRA of the steps done so far) and quit?"):
                event.ignore()
                return
            self._close_when_stopped = True
            if not self.controller.stopping:
                self.stop_training()
            self.statusBar().showMessage("Stopping the run; the window closes when it has stopped…")
            event.ignore()
            return
        QApplication.setOverrideCursor(Qt.WaitCursor)
        try:
            self.shutdown()
        finally:
            QApplication.restoreOverrideCursor()
        self.save_state()
        event.accept()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.PaletteChange:
            self.refresh_icons()

    def _on_scheme_changed(self, *_: Any) -> None:
        theme.apply_theme(QApplication.instance())  # the palette change reaches changeEvent, which redraws icons

    def refresh_icons(self) -> None:
        self.refresh_rail()
        for page in self.pages.values():
            page.refresh_icons()
        self.train_page.loss_plot.apply_theme()


_GENERAL_HELP = ("Keyboard: Ctrl+O open a job, Ctrl+S save it, Ctrl+Return start training, Esc stop (asks first), "
                 "F1 this help. Job files are the same TOML files the <code>lora-studio train</code> command reads.")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def about_html() -> str:
    import PySide6
    from PySide6.QtCore import qVersion

    rows = [("LoRA Studio", app_info.VERSION), ("PyTorch", _version("torch")), ("diffusers", _version("diffusers")),
            ("PEFT", _version("peft")), ("transformers", _version("transformers")), ("Qt", qVersion()),
            ("PySide6", PySide6.__version__), ("Python", platform.python_version())]
    table = "".join(f"<tr><td>{k}</td><td>&nbsp;&nbsp;{v}</td></tr>" for k, v in rows)
    return (f"<h3>{app_info.APP_NAME} {app_info.VERSION}</h3><p>{app_info.SUMMARY}.</p><table>{table}</table>"
            f"<p><a href='{app_info.HOMEPAGE}'>{app_info.HOMEPAGE}</a></p>")
