"""The parts a model file lacks (FLUX.1's CLIP-L, T5 and VAE; SD3.5's CLIP-L, CLIP-G and optional T5 …), asked for by
the family's part names: found or chosen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from studio.engine.config import ModelSection
from studio.ui import backend
from studio.ui.job_model import JobModel
from studio.ui.worker import TaskRunner

# The job fields parts are chosen in: model.<part name> (model.vae, model.text_encoder … model.text_encoder_3).
FIELD = "model.{}"
MODEL_FIELDS = tuple(f"model.{f.name}" for f in dataclasses.fields(ModelSection))


class PartsPanel(QWidget):
    """One row per missing part: its label, the file found or chosen (or "missing"), and a "Choose…" button.

    Driven by ``Family.part_files`` (engine, off the GUI thread), so a family with other parts gets its own rows.
    """

    parts_changed = Signal()

    def __init__(self, model: JobModel, tasks: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.model, self.tasks = model, tasks
        self._last: list = []
        self.family: str | None = None
        self.rows: dict[str, tuple[str, str | None]] = {}  # part name → (label, file or None)
        self.optional: set[str] = set()  # parts the model works without (SD3's T5: zeros in its place)
        self.error = ""  # why the parts could not be looked up (a file chosen for the wrong part)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("Parts this file does not carry, found beside it or in ComfyUI/A1111's folders, or chosen:")
        self.title.setWordWrap(True)
        outer.addWidget(self.title)
        self.grid = QGridLayout()
        outer.addLayout(self.grid)
        self.error_label = QLabel()
        self.error_label.setObjectName("error")
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        outer.addWidget(self.error_label)
        self._widgets: list[QWidget] = []
        model.changed.connect(self._on_changed)
        self.hide()

    @property
    def missing(self) -> list[str]:
        """Labels of the required parts neither chosen nor found."""
        return [label for name, (label, file) in self.rows.items() if file is None and name not in self.optional]

    def show_for(self, family: str | None) -> None:
        """Look up the parts of the job's model for ``family`` (None: nothing to ask for)."""
        self.family = family
        self.tasks.cancel("parts")
        if not family:
            self._show([])
            return
        values = {name.split(".", 1)[1]: self.model.value(name) for name in MODEL_FIELDS}
        self.tasks.run("parts", backend.model_parts, family, values, engine=True, what="Looking for the model's parts",
                       on_done=self._show, on_error=lambda message, details: self._show(self._last, message))

    def _on_changed(self, path: str, value) -> None:
        if path.startswith("model.") and path != "model.path" and self.family and (self.rows or self.error):
            self.show_for(self.family)

    def _show(self, parts: list, error: str = "") -> None:
        self._last = parts
        self.error = error
        self.error_label.setText(error)
        self.error_label.setVisible(bool(error))
        for widget in self._widgets:
            self.grid.removeWidget(widget)  # now, not at deleteLater: the new rows take the same cells
            widget.deleteLater()
        self._widgets.clear()
        self.rows = {name: (label, file) for name, label, file, _ in parts}
        self.optional = {name for name, _, _, required in parts if not required}
        for row, (name, (label, file)) in enumerate(self.rows.items()):
            title = QLabel(label[:1].upper() + label[1:])
            optional = name in self.optional
            where = QLabel(Path(file).name if file else "not found (optional): choose the file to use it" if optional
                           else "missing: choose the file")
            where.setToolTip(file or "")
            where.setObjectName("muted" if file or optional else "error")
            choose = QPushButton("Choose…")
            choose.clicked.connect(lambda _=False, n=name, t=label: self._choose(n, t))
            for col, widget in enumerate((title, where, choose)):
                self.grid.addWidget(widget, row, col)
                self._widgets.append(widget)
        self.setVisible(bool(self.rows) or bool(error))
        self.parts_changed.emit()

    def _choose(self, name: str, label: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Choose the {label}", "", "Model files (*.safetensors *.sft)")
        if path:
            self.choose(name, path)

    def choose(self, name: str, path: str) -> None:
        """Set the part's file in the job (the rows refresh from the engine)."""
        self.model.set_value(FIELD.format(name), path)
