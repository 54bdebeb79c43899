"""QueuePanel: the job queue (engine.job_queue) as a list with add, reorder, remove, run and open-its-run."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout, QWidget

from studio.engine.job_queue import JobQueue, QueuedJob
from studio.ui import theme

STATE_TEXT = {"waiting": "waiting", "running": "training…", "finished": "finished", "failed": "failed",
              "stopped": "stopped"}


class QueuePanel(QWidget):
    """Widgets bound to a :class:`JobQueue`; every change is saved to its file at once."""

    add_requested = Signal()  # "add the current job": the window knows the job
    run_requested = Signal()
    open_run_requested = Signal(object)  # a finished QueuedJob

    def __init__(self, queue: JobQueue, parent: QWidget | None = None):
        super().__init__(parent)
        self.queue = queue
        s = theme.SPACING
        layout = QVBoxLayout(self)
        layout.setContentsMargins(s, s, s, s)
        layout.setSpacing(s)
        self.hint = QLabel("Jobs here train one after another. Add the current job, order them, then Run queue.")
        self.hint.setWordWrap(True)
        self.hint.setObjectName("muted")
        self.list = QListWidget()
        self.list.itemDoubleClicked.connect(lambda _: self._open_selected())
        self.add_button = QPushButton(theme.icon("start"), "Add current job")
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.remove_button = QPushButton("Remove")
        self.run_button = QPushButton(theme.icon("start"), "Run queue")
        self.open_button = QPushButton(theme.icon("export"), "Open its run")
        self.add_button.clicked.connect(self.add_requested)
        self.up_button.clicked.connect(lambda: self._move(-1))
        self.down_button.clicked.connect(lambda: self._move(1))
        self.remove_button.clicked.connect(self._remove)
        self.run_button.clicked.connect(self.run_requested)
        self.open_button.clicked.connect(self._open_selected)
        self.list.currentRowChanged.connect(lambda _: self._refresh_buttons())
        row1, row2 = QHBoxLayout(), QHBoxLayout()
        for b in (self.add_button, self.remove_button):
            row1.addWidget(b)
        for b in (self.up_button, self.down_button, self.open_button):
            row2.addWidget(b)
        layout.addWidget(self.hint)
        layout.addWidget(self.list, 1)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.run_button)
        self.refresh()

    def refresh(self) -> None:
        current = self.list.currentRow()
        self.list.clear()
        for entry in self.queue.entries:
            item = QListWidgetItem(f"{entry.name} — {STATE_TEXT.get(entry.state, entry.state)}")
            item.setToolTip(entry.message or entry.job_file)
            self.list.addItem(item)
        if self.queue.entries:
            self.list.setCurrentRow(max(0, min(current, len(self.queue.entries) - 1)))
        self._refresh_buttons()

    def selected(self) -> QueuedJob | None:
        row = self.list.currentRow()
        return self.queue.entries[row] if 0 <= row < len(self.queue.entries) else None

    def _refresh_buttons(self) -> None:
        entry = self.selected()
        movable = entry is not None and entry.state != "running"
        self.up_button.setEnabled(movable and self.list.currentRow() > 0)
        self.down_button.setEnabled(movable and self.list.currentRow() < len(self.queue.entries) - 1)
        self.remove_button.setEnabled(movable)
        self.open_button.setEnabled(entry is not None and bool(entry.run_dir))
        self.run_button.setEnabled(self.queue.next_waiting() is not None)

    def _move(self, by: int) -> None:
        row = self.list.currentRow()
        self.queue.move(row, row + by)
        self.queue.save()
        self.refresh()
        self.list.setCurrentRow(row + by)

    def _remove(self) -> None:
        row = self.list.currentRow()
        if row >= 0:
            self.queue.remove(row)
            self.queue.save()
            self.refresh()

    def _open_selected(self) -> None:
        entry = self.selected()
        if entry is not None and entry.run_dir and Path(entry.run_dir).is_dir():
            self.open_run_requested.emit(entry)
