"""The parts a model file lacks (Flux's CLIP-L, T5 and VAE …), asked for by the family's part names: found or chosen."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from studio.ui import backend
from studio.ui.job_model import JobModel
from studio.ui.worker import TaskRunner

# The job fields parts are chosen in: model.<part name> (model.vae, model.text_encoder, model.text_encoder_2 …).
FIELD = "model.{}"


class PartsPanel(QWidget):
    """One row per missing part: its label, the file found or chosen (or "missing"), and a "Choose…" button.

    Driven by ``Family.part_files`` (engine, off the GUI thread), so a family with other parts gets its own rows.
    """

    parts_changed = Signal()

    def __init__(self, model: JobModel, tasks: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.model, self.tasks = model, tasks
        self.family: str | None = None
        self.rows: dict[str, tuple[str, str | None]] = {}  # part name → (label, file or None)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("This file holds only the denoiser; it also needs:")
        self.title.setWordWrap(True)
        outer.addWidget(self.title)
        self.grid = QGridLayout()
        outer.addLayout(self.grid)
        self._widgets: list[QWidget] = []
        model.changed.connect(self._on_changed)
        self.hide()

    @property
    def missing(self) -> list[str]:
        """Labels of the parts neither chosen nor found."""
        return [label for label, file in self.rows.values() if file is None]

    def show_for(self, family: str | None) -> None:
        """Look up the parts of the job's model for ``family`` (None: nothing to ask for)."""
        self.family = family
        self.tasks.cancel("parts")
        if not family:
            self._show([])
            return
        values = {name.split(".", 1)[1]: self.model.value(name) for name in
                  ("model.path", "model.vae", "model.text_encoder", "model.text_encoder_2", "model.config_dir")}
        self.tasks.run("parts", backend.model_parts, family, values, engine=True, what="Looking for the model's parts",
                       on_done=self._show, on_error=lambda message, details: self._show([]))

    def _on_changed(self, path: str, value) -> None:
        if path.startswith("model.") and path != "model.path" and self.family and self.rows:
            self.show_for(self.family)

    def _show(self, parts: list) -> None:
        for widget in self._widgets:
            self.grid.removeWidget(widget)  # now, not at deleteLater: the new rows take the same cells
            widget.deleteLater()
        self._widgets.clear()
        self.rows = {name: (label, file) for name, label, file in parts}
        for row, (name, (label, file)) in enumerate(self.rows.items()):
            title = QLabel(label[:1].upper() + label[1:])
            where = QLabel(Path(file).name if file else "missing: choose the file")
            where.setToolTip(file or "")
            where.setObjectName("muted" if file else "error")
            choose = QPushButton("Choose…")
            choose.clicked.connect(lambda _=False, n=name, t=label: self._choose(n, t))
            for col, widget in enumerate((title, where, choose)):
                self.grid.addWidget(widget, row, col)
                self._widgets.append(widget)
        self.setVisible(bool(self.rows))
        self.parts_changed.emit()

    def _choose(self, name: str, label: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Choose the {label}", "", "Model files (*.safetensors *.sft)")
        if path:
            self.choose(name, path)

    def choose(self, name: str, path: str) -> None:
        """Set the part's file in the job (the rows refresh from the engine)."""
        self.model.set_value(FIELD.format(name), path)
