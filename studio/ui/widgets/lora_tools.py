"""LoRA tools panel on Try & Export: resize the selected LoRA by SVD, merge it with others at chosen strengths."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

from PySide6.QtWidgets import (
    QDoubleSpinBox, QFileDialog, QGridLayout, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton,
    QSpinBox, QVBoxLayout, QWidget,
)

from studio.ui import backend
from studio.ui.pages.base import section_label
from studio.ui.widgets.banner import Banner


class LoraToolsWidget(QWidget):
    """Works on the page's selected LoRA (``selected()``), in the page's background tasks; results in its banner."""

    def __init__(self, tasks: Any, selected: Callable[[], Path | None], parent: QWidget | None = None):
        super().__init__(parent)
        self.tasks = tasks
        self.selected = selected
        self.written: Path | None = None
        self.last_result: Any = None
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(section_label("LoRA tools"))
        grid = QGridLayout()
        self.rank = QSpinBox()
        self.rank.setRange(0, 1024)
        self.rank.setSpecialValueText("any")
        self.rank.setToolTip("Largest rank to keep (any: decided by the norm fraction alone).")
        self.fraction = QDoubleSpinBox()
        self.fraction.setRange(0.0, 1.0)
        self.fraction.setSingleStep(0.05)
        self.fraction.setDecimals(3)
        self.fraction.setSpecialValueText("off")
        self.fraction.setValue(0.9)
        self.fraction.setToolTip("Keep the fewest ranks whose singular values hold this fraction of the LoRA's "
                                 "Frobenius norm in every module.")
        self.resize_button = QPushButton("Resize…")
        self.resize_button.setToolTip("Write a smaller LoRA (SVD); the kept norm fraction is shown.")
        self.resize_button.clicked.connect(self._ask_resize)
        grid.addWidget(QLabel("Rank"), 0, 0)
        grid.addWidget(self.rank, 0, 1)
        grid.addWidget(QLabel("Keep norm"), 0, 2)
        grid.addWidget(self.fraction, 0, 3)
        grid.addWidget(self.resize_button, 0, 4)
        col.addLayout(grid)
        self.others = QListWidget()
        self.others.setToolTip("Other LoRAs merged into the selected one; strength per file (the selected LoRA "
                               "counts at strength 1).")
        self.others.setMaximumHeight(self.fontMetrics().height() * 5)
        self.strengths: list[QDoubleSpinBox] = []
        col.addWidget(self.others)
        row = QHBoxLayout()
        self.add_button = QPushButton("Add LoRA to merge…")
        self.add_button.clicked.connect(self._ask_add)
        self.merge_button = QPushButton("Merge…")
        self.merge_button.setToolTip("Write one LoRA equal to the selected one plus the listed ones at their strengths.")
        self.merge_button.clicked.connect(self._ask_merge)
        row.addWidget(self.add_button)
        row.addWidget(self.merge_button)
        row.addStretch(1)
        col.addLayout(row)
        self.banner = Banner()
        col.addWidget(self.banner)

    # ------------------------------------------------------------------------------------------ merge list

    def add_other(self, path: Path, strength: float = 1.0) -> None:
        item = QListWidgetItem(self.others)
        box = QWidget()
        line = QHBoxLayout(box)
        line.setContentsMargins(0, 0, 0, 0)
        line.addWidget(QLabel(Path(path).name), 1)
        spin = QDoubleSpinBox()
        spin.setRange(-10.0, 10.0)
        spin.setSingleStep(0.1)
        spin.setValue(strength)
        spin.setProperty("path", str(path))
        line.addWidget(spin)
        item.setSizeHint(box.sizeHint())
        self.others.setItemWidget(item, box)
        self.strengths.append(spin)

    def _ask_add(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "LoRAs to merge", "", "LoRA files (*.safetensors)")
        for f in files:
            self.add_other(Path(f))

    # ------------------------------------------------------------------------------------------ actions

    def _target(self, suffix: str) -> Path | None:
        src = self.selected()
        if src is None:
            return None
        name, _ = QFileDialog.getSaveFileName(self, "Save LoRA", str(src.with_name(f"{src.stem}-{suffix}.safetensors")),
                                              "LoRA files (*.safetensors)")
        return Path(name) if name else None

    def _ask_resize(self) -> None:
        target = self._target("resized")
        if target is not None:
            self.resize_to(target)

    def _ask_merge(self) -> None:
        target = self._target("merged")
        if target is not None:
            self.merge_to(target)

    def resize_to(self, target: Path) -> None:
        src = self.selected()
        if src is None or self.tasks.is_running("lora_tool"):
            return
        rank = self.rank.value() or None
        fraction = self.fraction.value() or None
        self.tasks.run("lora_tool", backend.resize_lora, src, Path(target), rank=rank, fraction=fraction, engine=True,
                       what="Resizing the LoRA", on_done=self._resized,
                       on_error=lambda m, d: self.banner.show_message("error", m, d))

    def merge_to(self, target: Path) -> None:
        src = self.selected()
        if src is None or self.tasks.is_running("lora_tool"):
            return
        sources = [(src, 1.0)] + [(Path(s.property("path")), s.value()) for s in self.strengths]
        self.tasks.run("lora_tool", backend.merge_loras, sources, Path(target), engine=True, what="Merging LoRAs",
                       on_done=self._merged, on_error=lambda m, d: self.banner.show_message("error", m, d))

    def _resized(self, result: Any) -> None:
        self.last_result, self.written = result, Path(result.path)
        self.banner.show_message("success", (
            f"Saved <b>{html.escape(self.written.name)}</b>: rank {result.rank_before} → {result.rank_after}, "
            f"kept {result.kept_fraction:.1%} of the norm (worst module {result.worst_module_fraction:.1%})."))

    def _merged(self, result: dict) -> None:
        self.last_result, self.written = result, Path(result["path"])
        self.banner.show_message("success", (
            f"Saved <b>{html.escape(self.written.name)}</b>: {result['sources']} LoRAs merged, rank {result['rank']}."))
