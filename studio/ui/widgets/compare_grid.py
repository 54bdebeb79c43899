"""Compare steps: a grid of a run's saved LoRAs (rows) at several strengths (columns), drawn in the background."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QComboBox, QGridLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QScrollArea, QSizePolicy, QSpinBox,
    QVBoxLayout, QWidget,
)

from studio.ui import theme
from studio.ui.widgets.banner import Banner
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.gallery import ImageDialog


def render_cells(cache: Any, model: Any, run_dir: Path, spec: Any, rows: list, *,
                 progress: Callable[[Any], None], stop: threading.Event) -> Any:
    """The background part: every cell from the run's cache, loading the base model only if one is missing."""
    from studio.engine.grid import cell_key, render_grid

    folder = Path(run_dir) / "grid"
    missing = any(not (folder / f"{cell_key(spec, model.path, row.path, s)}.png").is_file()
                  for row in rows for s in spec.strengths)
    if not missing:
        return render_grid(None, run_dir, spec, rows, model_path=model.path, progress=progress, stop=stop)
    with cache.exclusive(model) as bundle:
        return render_grid(bundle, run_dir, spec, rows, model_path=model.path, progress=progress, stop=stop)


class GridCell(QLabel):
    """One picture of the grid; a click enlarges it."""

    clicked = Signal()

    def __init__(self, side: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("imageSlot")
        self.setAlignment(Qt.AlignCenter)
        self.setFixedSize(side, side)
        self.setCursor(Qt.PointingHandCursor)
        self.pixmap_: QPixmap | None = None
        self.caption = ""

    def set_image(self, pixmap: QPixmap, caption: str) -> None:
        self.pixmap_ = pixmap
        self.caption = caption
        mode = Qt.FastTransformation if pixmap.width() < 256 else Qt.SmoothTransformation  # small ones stay crisp
        self.setPixmap(pixmap.scaled(self.size() * 0.96, Qt.KeepAspectRatio, mode))
        self.setToolTip(caption)

    def mousePressEvent(self, event) -> None:
        if self.pixmap_ is not None:
            self.clicked.emit()
        super().mousePressEvent(event)


class CompareGridWidget(QWidget):
    """Rows = the run's saved steps, columns = strengths, one prompt and seed; ``step_chosen(path)`` picks a row's
    LoRA (for export), a cell click enlarges it. The cells are cached in the run folder by the engine."""

    step_chosen = Signal(object)  # Path of the LoRA file
    grid_ready = Signal()

    def __init__(self, tasks: Any, cache: Any, model_section: Callable[[], Any], parent: QWidget | None = None):
        super().__init__(parent)
        self.tasks = tasks
        self.cache = cache
        self._model_section = model_section  # the base model to render with (the job's, read when asked)
        self.run_dir: Path | None = None
        self.job: Any = None
        self.rows: list = []
        self.grid: Any = None
        self.cells: dict[tuple[int, int], GridCell] = {}
        s = theme.SPACING

        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(s)
        controls = QHBoxLayout()
        controls.setSpacing(s)
        self.prompt = QComboBox()
        self.prompt.setEditable(True)
        self.prompt.setInsertPolicy(QComboBox.NoInsert)
        self.prompt.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.prompt.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.prompt.setMinimumContentsLength(12)
        self.prompt.setToolTip("The prompt of every cell: the run's preview prompts, or write your own.")
        self.strengths = QLineEdit("0, 0.5, 1")
        self.strengths.setToolTip("LoRA strengths, one column each; 0 is the base model, 1 as trained.")
        self.strengths.setMinimumWidth(theme.em(self) * 6)
        self.strengths.setMaximumWidth(theme.em(self) * 10)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(1234)
        self.seed.setToolTip("The same seed in every cell, so only the step and strength differ.")
        self.render_button = QPushButton(theme.icon("wand"), "Compare")
        self.render_button.setObjectName("primary")
        self.render_button.clicked.connect(self.render_grid)
        prompt_row = QHBoxLayout()  # its own row: the window's narrowest size stays what it was
        prompt_row.setSpacing(s)
        prompt_row.addWidget(QLabel("Prompt"))
        prompt_row.addWidget(self.prompt, 1)
        col.addLayout(prompt_row)
        controls.addWidget(QLabel("Strengths"))
        controls.addWidget(self.strengths)
        controls.addWidget(QLabel("Seed"))
        controls.addWidget(self.seed)
        controls.addStretch(1)
        controls.addWidget(self.render_button)
        col.addLayout(controls)
        self.busy = BusyIndicator()
        col.addWidget(self.busy)
        self.banner = Banner()
        col.addWidget(self.banner)
        self.note = QLabel("Each row is a LoRA the run saved (set “Save every” on Settings for more rows); each "
                           "column a strength. Click a picture to enlarge it, a step's button to export that step.")
        self.note.setObjectName("muted")
        self.note.setWordWrap(True)
        col.addWidget(self.note)
        self.area = QScrollArea()
        self.area.setWidgetResizable(True)
        self.area.setFrameShape(QScrollArea.NoFrame)
        self.board = QWidget()
        self.layout_grid = QGridLayout(self.board)
        self.layout_grid.setSpacing(s)
        self.layout_grid.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.area.setWidget(self.board)
        col.addWidget(self.area, 1)

    # ---------------------------------------------------------------------------------------------- input

    def set_run(self, run_dir: Path | None, prompts: list[str]) -> None:
        """Show a run folder's saved steps (empty cells until Compare); ``prompts`` fill the prompt picker."""
        from studio.engine.grid import GridError, grid_rows, run_job

        self.tasks.cancel("grid")
        self.run_dir = Path(run_dir) if run_dir else None
        self.rows, self.job, self.grid = [], None, None
        self.banner.hide()
        if self.run_dir is not None:
            try:
                self.job = run_job(self.run_dir)
                self.rows = grid_rows(self.run_dir, self.job.output.name)
            except (GridError, OSError, ValueError) as exc:
                self.banner.show_message("info", str(exc))
        current = self.prompt.currentText()
        self.prompt.clear()
        for p in dict.fromkeys(p for p in prompts if p):
            self.prompt.addItem(p)
        if current and self.prompt.findText(current) < 0 and not prompts:
            self.prompt.setEditText(current)
        self.render_button.setEnabled(bool(self.rows))
        if self.run_dir is None:
            self.note.setText("Compare steps works on a run folder: train a LoRA (its saved steps become rows).")
        self._build_board()

    def spec(self) -> Any:
        """The grid the controls describe; raises GridError for unreadable strengths or an empty prompt."""
        from studio.engine.grid import GridError, GridSpec, parse_strengths

        prompt = self.prompt.currentText().strip()
        if not prompt:
            raise GridError("write a prompt first (with the trigger word, so the LoRA has something to respond to)")
        job = self.job
        return GridSpec(prompt=prompt, strengths=parse_strengths(self.strengths.text()), seed=self.seed.value(),
                        steps=job.sampling.steps if job else 20, guidance=job.sampling.guidance if job else 7.0,
                        negative_prompt=job.sampling.negative_prompt if job else "",
                        size=(job.sampling.width or job.dataset.resolution) if job else None)

    # ---------------------------------------------------------------------------------------------- drawing

    def render_grid(self) -> None:
        from studio.engine.grid import GridError

        if not self.rows or self.run_dir is None:
            return
        try:
            spec = self.spec()
        except GridError as exc:
            self.banner.show_message("warning", str(exc)[:1].upper() + str(exc)[1:] + ".")
            return
        self.banner.hide()
        self._spec = spec
        self._build_board()
        total = len(self.rows) * len(spec.strengths)
        self.busy.start(f"Drawing the grid: 0 / {total} pictures…")
        self.render_button.setEnabled(False)
        self.tasks.run("grid", render_cells, self.cache, self._model_section(), self.run_dir, spec, list(self.rows),
                       progress=True, stoppable=True, engine=True, what="Drawing the grid",
                       on_progress=self._on_cell, on_done=self._on_done,
                       on_error=lambda m, d: self.banner.show_message("error", m, d),
                       on_finished=self._finished)

    @property
    def rendering(self) -> bool:
        return self.tasks.is_running("grid")

    def _on_cell(self, cell: Any) -> None:
        widget = self.cells.get((cell.row, cell.column))
        self.busy.set_text(f"Drawing the grid: {cell.done} / {cell.total} pictures…")
        if widget is None:
            return
        from studio.engine.grid import strength_label

        row = self.rows[cell.row]
        caption = f"{row.label} · {strength_label(self._spec.strengths[cell.column])} · “{self._spec.prompt}”, " \
                  f"seed {self._spec.seed}"
        widget.set_image(QPixmap(str(cell.image_path)), caption)

    def _on_done(self, grid: Any) -> None:
        self.grid = grid
        self.grid_ready.emit()

    def _finished(self) -> None:
        self.busy.stop()
        self.render_button.setEnabled(bool(self.rows))

    def _build_board(self) -> None:
        from studio.engine.grid import DEFAULT_STRENGTHS, GridError, parse_strengths, strength_label

        while self.layout_grid.count():
            item = self.layout_grid.takeAt(0)
            widget = item.widget()
            if widget is not None:
                widget.hide()  # gone now: deleteLater waits for the event loop's next turn
                widget.setParent(None)
                widget.deleteLater()
        self.cells = {}
        if not self.rows:
            return
        try:
            strengths = parse_strengths(self.strengths.text())
        except GridError:
            strengths = DEFAULT_STRENGTHS
        side = theme.em(self) * 6
        for c, strength in enumerate(strengths):
            head = QLabel(strength_label(strength))
            head.setAlignment(Qt.AlignCenter)
            head.setObjectName("muted")
            self.layout_grid.addWidget(head, 0, c + 1)
        for r, row in enumerate(self.rows):
            button = QPushButton(theme.icon("export"), row.label)
            button.setToolTip(f"Choose {row.path.name} for export")
            button.clicked.connect(lambda _=False, p=row.path: self.step_chosen.emit(p))
            self.layout_grid.addWidget(button, r + 1, 0)
            for c in range(len(strengths)):
                cell = GridCell(side)
                cell.clicked.connect(lambda cell=cell: self.enlarge(cell))
                self.layout_grid.addWidget(cell, r + 1, c + 1)
                self.cells[(r, c)] = cell

    def enlarge(self, cell: GridCell) -> ImageDialog | None:
        if cell.pixmap_ is None:
            return None
        dialog = ImageDialog(cell.pixmap_, cell.caption, self)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.open()
        return dialog
