"""Train page: what is missing, Start/Pause/Resume/Stop, progress, the loss curve, previews and the log."""

from __future__ import annotations

import html
import time
from pathlib import Path

from PySide6.QtCore import QEvent, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QPixmap
from PySide6.QtWidgets import (
    QFileDialog, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton, QSizePolicy, QSplitter, QVBoxLayout, QWidget,
)

from studio.engine.events import (
    CheckpointSaved, LogMessage, RunCancelled, RunFailed, RunFinished, RunStarted, SampleReady, StatusChanged,
    StepCompleted, ValidationCompleted,
)
from studio.ui import theme
from studio.ui.format import format_duration, format_rate, plural
from studio.ui.job_model import JobModel
from studio.ui.pages.base import ATTENTION, DONE, PENDING, RUNNING, Page, card, page_for_field, section_label
from studio.ui.widgets.banner import Banner
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.gallery import ImageDialog, SampleGallery
from studio.ui.widgets.loss_plot import LossPlot
from studio.ui.widgets.message_area import MessageArea

class TrainPage(Page):
    title = "Train"
    icon_name = "train"
    purpose = "Start training and watch it learn: the loss should drift down and the previews move towards your images."
    help_html = (
        "<p><b>Start</b> (Ctrl+Return) begins a run in a new run folder; nothing earlier is overwritten. "
        "<b>Pause</b> saves a checkpoint and keeps the model loaded, <b>Resume</b> carries on, <b>Stop</b> (Esc) "
        "ends the run and keeps a usable LoRA of the steps done so far.</p>"
        "<p>The <b>loss</b> is noisy by nature; watch the smoothed line. Previews are made with the same prompts "
        "and seeds every time, so you can compare them step by step. Click one to enlarge it.</p>")

    start_requested = Signal()
    pause_requested = Signal()
    resume_requested = Signal()
    stop_requested = Signal()
    go_to_page = Signal(str)
    try_requested = Signal()
    resume_run_requested = Signal(object)  # an engine UnfinishedRun
    lora_rescued = Signal(object, object)  # (run folder, the LoRA file saved elsewhere after a full disk)

    def __init__(self, model: JobModel, parent: QWidget | None = None, tasks=None):
        super().__init__(parent)
        self.model = model
        self.tasks = tasks  # a TaskRunner: saving elsewhere runs off the GUI thread (a big LoRA, a slow disk)
        self.unsaved = None  # the trained LoRA a full disk would not take (engine UnsavedLora), until saved
        self.run_state = "idle"  # idle | starting | running | paused | stopping | finished | failed | cancelled
        self.run_dir: Path | None = None
        self.lora_path: Path | None = None
        self.step = 0
        self.total_steps = 0
        s = theme.SPACING

        # What is missing / ready.
        self.checklist_card, cl = card()
        self.checklist = QLabel()
        self.checklist.setWordWrap(True)
        self.checklist.setTextFormat(Qt.RichText)
        self.checklist.linkActivated.connect(lambda page: self.go_to_page.emit(page))
        cl.addWidget(self.checklist)

        # Controls and progress.
        controls_card, cc = card()
        buttons = QHBoxLayout()
        buttons.setSpacing(s)
        self.start_button = QPushButton(theme.icon("start"), "Start training")
        self.start_button.setObjectName("primary")
        self.start_button.setToolTip("Start training (Ctrl+Return)")
        self.pause_button = QPushButton(theme.icon("pause"), "Pause")
        self.pause_button.setToolTip("Pause at the next step; the model stays loaded")
        self.resume_button = QPushButton(theme.icon("start"), "Resume")
        self.stop_button = QPushButton(theme.icon("stop"), "Stop")
        self.stop_button.setToolTip("Stop at the next step and keep a LoRA of what was trained (Esc)")
        self.start_button.clicked.connect(self.start_requested)
        self.pause_button.clicked.connect(self.pause_requested)
        self.resume_button.clicked.connect(self.resume_requested)
        self.stop_button.clicked.connect(self.stop_requested)
        for b in (self.start_button, self.pause_button, self.resume_button, self.stop_button):
            buttons.addWidget(b)
        self._steady_buttons()
        buttons.addSpacing(2 * s)
        self.phase = BusyIndicator()
        # The spinner's room stays when it is hidden, so showing it never pushes or squeezes the buttons.
        policy = self.phase.sizePolicy()
        policy.setRetainSizeWhenHidden(True)
        self.phase.setSizePolicy(policy)
        buttons.addWidget(self.phase, 1)
        self.phase_label = QLabel()
        self.phase_label.setObjectName("muted")
        # Its text (a model or dataset path, "3 / 40 images") must not size the page: a long path widened the
        # window and every status relaid it out, each time repainting the loss plot twice (20-50 ms of Python on
        # the GUI thread under load; benchmarks/gui_stalls.py). It takes the row's spare room and clips.
        self.phase_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.phase_label.setMinimumWidth(theme.em(self) * 4)
        buttons.addWidget(self.phase_label, 2)
        cc.addLayout(buttons)
        progress_row = QHBoxLayout()
        progress_row.setSpacing(2 * s)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("not started")
        self.progress.setTextVisible(True)
        self.rate_label = QLabel("— it/s")
        self.eta_label = QLabel("ETA —")
        self.elapsed_label = QLabel("")
        for w in (self.rate_label, self.eta_label, self.elapsed_label):
            w.setObjectName("muted")
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.rate_label)
        progress_row.addWidget(self.eta_label)
        progress_row.addWidget(self.elapsed_label)
        cc.addLayout(progress_row)
        # Controls first: the checklist below them comes and goes (hidden during a run) without moving them.
        self.layout_.addWidget(controls_card)
        self.layout_.addWidget(self.checklist_card)

        self.banner = Banner(rich_text=True)  # every message here is composed HTML with escaped parts
        self.try_button = self.banner.add_action(QPushButton(theme.icon("export"), "Try && export"))
        self.try_button.clicked.connect(self.try_requested)
        self.folder_button = self.banner.add_action(QPushButton(theme.icon("folder"), "Show run folder"))
        self.folder_button.clicked.connect(self.open_run_folder)
        self.rescue_button = self.banner.add_action(QPushButton(theme.icon("export"), "Save LoRA elsewhere…"))
        self.rescue_button.setToolTip("The disk was full: save the trained LoRA, still in memory, to another "
                                      "disk or folder")
        self.rescue_button.clicked.connect(self.save_elsewhere)
        self.rescue_button.hide()
        # One message at a time (the latest, errors first); the others stay one click away.
        self.messages = MessageArea()
        self.messages.add(self.banner)
        self.layout_.addWidget(self.messages)

        self.unfinished = None
        self.resume_banner = Banner(rich_text=True)
        self.resume_run_button = self.resume_banner.add_action(QPushButton(theme.icon("start"), "Resume it"))
        self.resume_run_button.clicked.connect(lambda: self.resume_run_requested.emit(self.unfinished))
        self.messages.add(self.resume_banner)

        # Plot | samples, over the log.
        vertical = QSplitter(Qt.Vertical)
        horizontal = QSplitter(Qt.Horizontal)
        plot_box = QWidget()
        pl = QVBoxLayout(plot_box)
        pl.setContentsMargins(0, 0, 0, 0)
        pl.setSpacing(s // 2)
        pl.addWidget(section_label("Loss and learning rate"))
        # Shown (empty) from the start: its first paint is costly and must not fall in the middle of a run.
        self.loss_plot = LossPlot()
        # Messages and the checklist take their room from the log, never below this from the plot.
        self.loss_plot.setMinimumHeight(theme.em(self) * 14)
        pl.addWidget(self.loss_plot, 1)
        samples_box = QWidget()
        sl = QVBoxLayout(samples_box)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.setSpacing(s // 2)
        sl.addWidget(section_label("Previews"))
        self.gallery = SampleGallery()
        self.gallery.sample_clicked.connect(self.enlarge)
        sl.addWidget(self.gallery, 1)
        horizontal.addWidget(plot_box)
        horizontal.addWidget(samples_box)
        horizontal.setStretchFactor(0, 3)
        horizontal.setStretchFactor(1, 2)
        log_box = QWidget()
        ll = QVBoxLayout(log_box)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.setSpacing(s // 2)
        ll.addWidget(section_label("Log"))
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setObjectName("log")
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setPlaceholderText("What the run is doing, warnings about your images, and errors.")
        ll.addWidget(self.log_view, 1)
        vertical.addWidget(horizontal)
        vertical.addWidget(log_box)
        vertical.setStretchFactor(0, 4)
        vertical.setStretchFactor(1, 1)
        em = theme.em(self)
        vertical.setSizes([em * 24, em * 6])
        horizontal.setSizes([em * 30, em * 20])
        self.layout_.addWidget(vertical, 1)

        model.problems_changed.connect(lambda _: self.refresh())
        self.refresh()

    # Every text a run-control button shows; each button is as wide as its widest text, Pause and Resume share one
    # slot, so no state change moves or resizes a button under the pointer.
    BUTTON_TEXTS = {"start": ("Start training",), "pause": ("Pause", "Pausing…", "Resume"),
                    "stop": ("Stop", "Stopping…")}

    def _steady_buttons(self) -> None:
        def widest(button: QPushButton, texts: tuple[str, ...]) -> int:
            shown = button.text()
            button.ensurePolished()
            width = 0
            for text in texts:
                button.setText(text)
                width = max(width, button.sizeHint().width())
            button.setText(shown)
            return width

        self.start_button.setFixedWidth(widest(self.start_button, self.BUTTON_TEXTS["start"]))
        pause = max(widest(self.pause_button, self.BUTTON_TEXTS["pause"]),
                    widest(self.resume_button, self.BUTTON_TEXTS["pause"]))
        self.pause_button.setFixedWidth(pause)
        self.resume_button.setFixedWidth(pause)
        self.stop_button.setFixedWidth(widest(self.stop_button, self.BUTTON_TEXTS["stop"]))

    def changeEvent(self, event) -> None:
        super().changeEvent(event)
        if event.type() in (QEvent.FontChange, QEvent.StyleChange) and hasattr(self, "stop_button"):
            self._steady_buttons()

    # ------------------------------------------------------------------------------------------- state

    def state(self) -> tuple[str, str]:
        if self.busy:
            return RUNNING, self.progress.text()
        if self.run_state == "finished":
            return DONE, "Training finished."
        if self.run_state == "failed":
            return ATTENTION, "The last run failed; see the Train page."
        if self.model.errors():
            return PENDING, "Some things are missing before training can start."
        return PENDING, "Ready to start."

    @property
    def busy(self) -> bool:
        return self.run_state in ("starting", "running", "pausing", "paused", "stopping")

    def set_run_state(self, state: str) -> None:
        self.run_state = state
        self.refresh()
        self.state_changed.emit()

    def refresh(self) -> None:
        errors = self.model.errors()
        busy = self.busy
        self.start_button.setEnabled(not busy and not errors)
        self.pause_button.setEnabled(self.run_state == "running")
        self.resume_button.setEnabled(self.run_state == "paused")
        self.stop_button.setEnabled(self.run_state in ("starting", "running", "pausing", "paused"))
        self.pause_button.setText("Pausing…" if self.run_state == "pausing" else "Pause")
        self.stop_button.setText("Stopping…" if self.run_state == "stopping" else "Stop")
        self.pause_button.setVisible(self.run_state != "paused")
        self.resume_button.setVisible(self.run_state == "paused")
        if busy:
            self.checklist_card.hide()
            return
        self.checklist_card.show()
        if errors:
            names = {"model": "Model", "dataset": "Dataset", "settings": "Settings"}
            lines = []
            for p in errors:
                page = page_for_field(p.field)
                label = self.model.field(p.field).label if p.field in {f.path for f in self.model.fields()} else p.field
                lines.append(f"<li><b>{html.escape(label)}</b>: {html.escape(p.message)} — "
                             f"<a href='{page}'>go to {names[page]}</a></li>")
            self.checklist.setText(f"<b>Before training can start:</b><ul style='margin:0'>{''.join(lines)}</ul>")
        else:
            j = self.model.job
            self.checklist.setText(
                f"<b>Ready to train</b> “{html.escape(j.output.name)}”: {j.training.steps} steps at "
                f"{j.dataset.resolution} px, rank {j.lora.rank}. Press <b>Start training</b> (Ctrl+Return).")

    # --------------------------------------------------------------------------------------- run events

    def offer_resume(self, run) -> None:
        """Say that an earlier run stopped before its end and can continue exactly where it left off."""
        self.unfinished = run
        if run is None:
            self.resume_banner.hide()
            return
        self.resume_banner.show_message(
            "info", f"The run in <b>{html.escape(str(run.run_dir))}</b> stopped at step {run.step} of "
                    f"{run.total_steps} without finishing. Resume it to continue exactly where it left off.")

    def run_starting(self) -> None:
        self.resume_banner.hide()
        self.loss_plot.clear()
        self.gallery.clear()
        self.log_view.clear()
        self.banner.hide()
        self.rescue_button.hide()
        self.run_dir = self.lora_path = self.unsaved = None
        self.step = self.total_steps = 0
        self._started = time.monotonic()
        self.progress.setRange(0, 0)  # busy until the first step reports the total
        self.progress.setFormat("starting…")
        self.rate_label.setText("— it/s")
        self.eta_label.setText("ETA —")
        self.elapsed_label.setText("")
        self.phase.start("Starting…")
        self.phase_label.setText("")
        self.log("info", "Starting the run.")
        self.set_run_state("starting")

    def on_run_started(self, event: RunStarted) -> None:
        self.run_dir = Path(event.run_dir)
        self.total_steps = event.total_steps
        self.progress.setRange(0, max(event.total_steps, 1))
        self.progress.setValue(event.start_step)
        self.progress.setFormat(f"step {event.start_step} / {event.total_steps}")
        if event.start_step > 0:
            self.show_earlier_part(self.run_dir, event.start_step)
        self.log("info", f"Training {plural(event.image_count, 'image')} for {event.total_steps} steps on "
                         f"{event.device} (run folder {event.run_dir}).")
        self.set_run_state("running")

    def show_earlier_part(self, run_dir: Path, up_to_step: int) -> None:
        """A resumed run: the loss curve and previews of the steps done before, from the run folder."""
        from studio.engine.runs import earlier_samples, read_metrics

        for row in read_metrics(run_dir):
            step, loss = row.get("step"), row.get("loss")
            if isinstance(step, int) and step <= up_to_step and isinstance(loss, (int, float)):
                self.loss_plot.add_point(step, float(loss), float(row.get("lr", float("nan"))))
        for sample in earlier_samples(run_dir, up_to_step):
            pixmap = QPixmap(str(sample.path))
            if not pixmap.isNull():
                self.gallery.add_sample(sample.step, sample.index, sample.prompt, pixmap, sample.path, sample.seed)

    def on_status(self, event: StatusChanged) -> None:
        text = event.phase + (f" — {event.message}" if event.message else "")
        if event.progress is not None:
            text += f" ({event.progress:.0%})"
        if event.phase.lower() == "paused":
            self.phase.stop()
            self.phase_label.setText(text)
            if self.run_state != "stopping":
                self.set_run_state("paused")
        else:
            if self.run_state == "paused":
                self.set_run_state("running")
            if self.run_state not in ("stopping", "pausing"):
                self.phase.start(event.phase if event.phase != "Training" else "Training…")
            self.phase_label.setText(event.message)
        self.log("info", text)

    def on_step(self, event: StepCompleted) -> None:
        self.step, self.total_steps = event.step, event.total_steps
        if self.progress.maximum() != event.total_steps:
            self.progress.setRange(0, max(event.total_steps, 1))
        self.progress.setValue(event.step)
        self.progress.setFormat(f"step {event.step} / {event.total_steps}")
        self.rate_label.setText(format_rate(event.steps_per_s))
        self.eta_label.setText(f"ETA {format_duration(event.eta_s)}")
        self.elapsed_label.setText(f"{format_duration(event.elapsed_s)} so far")
        self.loss_plot.add_point(event.step, event.loss, event.lr)
        if self.run_state == "starting":
            self.set_run_state("running")

    def on_validation(self, event: ValidationCompleted) -> None:
        self.loss_plot.add_validation_point(event.step, event.loss)
        self.log("info", f"Validation loss at step {event.step}: {event.loss:.4f} (lowest {event.best_loss:.4f} at "
                         f"step {event.best_step})")

    def on_sample(self, event: SampleReady, pixmap: QPixmap | None) -> None:
        if pixmap is None and event.path and Path(event.path).is_file():
            pixmap = QPixmap(str(event.path))
        if pixmap is None or pixmap.isNull():
            self.log("warning", f"Preview {event.path} could not be shown.")
            return
        self.gallery.add_sample(event.step, event.index, event.prompt, pixmap, event.path, event.seed)

    def on_checkpoint(self, event: CheckpointSaved) -> None:
        if event.lora_path:
            self.lora_path = Path(event.lora_path)
        self.log("info", f"Saved a checkpoint at step {event.step}"
                         + (f" and {Path(event.lora_path).name}" if event.lora_path else "") + ".")

    def on_finished(self, event: RunFinished) -> None:
        self.run_dir, self.lora_path = Path(event.run_dir), Path(event.lora_path)
        self.phase.stop()
        self.phase_label.setText("")
        self.progress.setRange(0, max(event.steps, 1))
        self.progress.setValue(event.steps)
        self.progress.setFormat(f"step {event.steps} / {event.steps} — done")
        self.eta_label.setText("")
        self.elapsed_label.setText(f"took {format_duration(event.elapsed_s)}")
        self.banner.show_message("success", f"Your LoRA is ready: <b>{html.escape(self.lora_path.name)}</b> in "
                                            f"{html.escape(str(self.run_dir))}. Try it against the base model, then export it.")
        self.try_button.show()
        self.folder_button.show()
        self.log("info", f"Finished: {event.lora_path}" + (
            f" (lowest validation loss {event.best_val_loss:.4f} at step {event.best_step})"
            if event.best_step is not None else ""))
        self.set_run_state("finished")

    def on_failed(self, event: RunFailed) -> None:
        self.phase.stop()
        self.phase_label.setText("")
        self.eta_label.setText("")
        self.progress.setFormat(f"failed at step {self.step}" if self.step else "failed")
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        self.run_dir = Path(event.run_dir) if event.run_dir else self.run_dir
        self.lora_path = Path(event.lora_path) if event.lora_path else self.lora_path
        extra = (f" The last saved LoRA ({self.lora_path.name}) is still usable." if event.lora_path else "")
        self.banner.show_message("error", html.escape(event.message) + extra, event.details)
        self.try_button.setVisible(bool(event.lora_path))
        self.folder_button.setVisible(self.run_dir is not None)
        self.unsaved = event.unsaved
        self.rescue_button.setVisible(self.unsaved is not None)
        self.log("error", event.message)
        self.set_run_state("failed")

    # ------------------------------------------------------------------------ a LoRA the disk would not take

    def choose_rescue_path(self) -> str:
        """Where to save the unsaved LoRA (a save dialog, which asks before replacing a file); "" if cancelled."""
        start = str(Path.home() / self.unsaved.name)
        path, _ = QFileDialog.getSaveFileName(self, "Save the trained LoRA elsewhere", start,
                                              "LoRA files (*.safetensors)")
        return path

    def save_elsewhere(self) -> None:
        if self.unsaved is None:
            return
        path = self.choose_rescue_path()
        if not path:
            return
        if not path.lower().endswith(".safetensors"):
            path += ".safetensors"
        self.rescue_button.setEnabled(False)
        self.phase.start("Saving the LoRA…")
        if self.tasks is None:
            try:
                saved = self.unsaved.save(path)
            except OSError as exc:
                self._rescue_failed(str(exc), "")
            else:
                self._rescued(saved)
            return
        self.tasks.run("rescue-lora", self.unsaved.save, path, what="Saving the LoRA", on_done=self._rescued,
                       on_error=self._rescue_failed)

    def _rescued(self, path: object) -> None:
        self.phase.stop()
        self.rescue_button.setEnabled(True)
        self.rescue_button.hide()
        self.unsaved, self.lora_path = None, Path(path)
        self.banner.show_message("success", f"The trained LoRA is saved as <b>{html.escape(str(path))}</b>. "
                                            "Try it against the base model, then export it.")
        self.try_button.show()
        self.log("info", f"Saved the trained LoRA to {path}.")
        self.lora_rescued.emit(self.run_dir, self.lora_path)

    def _rescue_failed(self, message: str, details: str) -> None:
        self.phase.stop()
        self.rescue_button.setEnabled(True)
        self.banner.show_message("error", f"{html.escape(message.rstrip('.'))}. The trained LoRA is still in memory: "
                                          "choose another disk or folder.", details)
        self.rescue_button.show()
        self.log("error", f"Saving the LoRA elsewhere failed: {message}")

    def on_cancelled(self, event: RunCancelled) -> None:
        self.phase.stop()
        self.phase_label.setText("")
        self.eta_label.setText("")
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        self.progress.setFormat(f"stopped at step {event.step}")
        self.run_dir = Path(event.run_dir) if event.run_dir else self.run_dir
        self.lora_path = Path(event.lora_path) if event.lora_path else None
        if self.lora_path:
            text = f"Stopped at step {event.step}. The LoRA of the steps done so far is saved as <b>{html.escape(self.lora_path.name)}</b>."
        else:
            text = "Stopped before any training step; nothing was saved."
        self.banner.show_message("info", text)
        self.try_button.setVisible(bool(self.lora_path))
        self.folder_button.setVisible(self.run_dir is not None)
        self.log("info", f"Stopped at step {event.step}.")
        self.set_run_state("cancelled")

    def on_log(self, event: LogMessage) -> None:
        self.log(event.level, event.message)

    def stopping(self) -> None:
        self.phase.start("Stopping at the end of this step…")
        self.set_run_state("stopping")

    def pausing(self) -> None:
        """Pause was clicked: say so at once; the run confirms with a "Paused" status at the step's end."""
        if self.run_state == "running":
            self.phase.start("Pausing at the end of this step…")
            self.set_run_state("pausing")

    def resuming(self) -> None:
        if self.run_state == "paused":
            self.phase.start("Training…")
            self.phase_label.setText("")
            self.set_run_state("running")

    # ------------------------------------------------------------------------------------------ helpers

    def log(self, level: str, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        prefix = {"warning": "⚠ ", "error": "✖ "}.get(level, "")
        bar = self.log_view.verticalScrollBar()
        following = bar.value() >= bar.maximum() - 2
        self.log_view.appendPlainText(f"{stamp}  {prefix}{message}")
        if following:
            # After the layout settles: a banner appearing above shrinks the log, which would hide the last lines.
            QTimer.singleShot(0, self.log_view, lambda: bar.setValue(bar.maximum()))

    def enlarge(self, pixmap: QPixmap, caption: str) -> None:
        dialog = ImageDialog(pixmap, caption, self)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.open()

    def open_run_folder(self) -> None:
        if self.run_dir:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.run_dir)))
