"""Settings page: presets, and every job setting generated from the job's field metadata (simple + advanced)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QInputDialog, QLabel, QMessageBox, QPushButton,
    QScrollArea, QVBoxLayout, QWidget,
)

from studio.engine import config
from studio.ui import backend, presets, theme
from studio.ui.format import format_bytes, format_duration, format_step_time
from studio.ui.job_model import JobModel
from studio.ui.pages.base import ATTENTION, DONE, Page, card, page_for_field
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.fields import FieldEditor

SECTION_TITLES = {"lora": "LoRA", "training": "Training", "dataset": "Images", "sampling": "Preview images",
                  "validation": "Validation loss", "output": "Output", "model": "Model"}
SECTION_ORDER = ("lora", "training", "dataset", "sampling", "validation", "output", "model")
# What changes the estimate; other settings (names, prompts) do not.
ESTIMATE_SECTIONS = ("model.", "dataset.resolution", "lora.", "training.")


class SettingsPage(Page):
    title = "Settings"
    icon_name = "settings"
    purpose = "How the LoRA is trained. The defaults suit most cases; point at a setting to see what it does."
    help_html = (
        "<p>Start from a <b>preset</b>: <i>Quick test</i> checks your data in minutes, <i>Balanced</i> suits most "
        "subjects, <i>High quality</i> trains longer with more capacity. <b>Save as preset</b> keeps your own.</p>"
        "<p>The most important settings: <b>rank</b> (capacity; 8–32), <b>steps</b> (how long), <b>learning "
        "rate</b>, and <b>resolution</b> (the model's native size). Settings marked in red must be fixed before "
        "training can start.</p><p>Tick <b>Show advanced settings</b> for everything else; every setting is "
        "explained in its tooltip.</p>")

    def __init__(self, model: JobModel, tasks, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.tasks = tasks
        self.editors: dict[str, FieldEditor] = {}
        self.estimate: Any = None
        s = theme.SPACING

        # Presets and the estimate.
        top = QHBoxLayout()
        top.setSpacing(2 * s)
        preset_card, preset_layout = card()
        row = QHBoxLayout()
        row.setSpacing(s)
        row.addWidget(QLabel("Preset"))
        self.preset_combo = QComboBox()
        self.preset_combo.setMinimumContentsLength(14)
        self.preset_combo.currentIndexChanged.connect(self._describe_preset)
        row.addWidget(self.preset_combo, 1)
        self.apply_button = QPushButton("Apply")
        self.apply_button.clicked.connect(self.apply_selected_preset)
        row.addWidget(self.apply_button)
        self.save_preset_button = QPushButton(theme.icon("save"), "Save as preset…")
        self.save_preset_button.clicked.connect(self.save_preset)
        row.addWidget(self.save_preset_button)
        self.delete_preset_button = QPushButton("Delete")
        self.delete_preset_button.clicked.connect(self.delete_preset)
        row.addWidget(self.delete_preset_button)
        preset_layout.addLayout(row)
        self.preset_description = QLabel()
        self.preset_description.setObjectName("muted")
        self.preset_description.setWordWrap(True)
        preset_layout.addWidget(self.preset_description)
        top.addWidget(preset_card, 3)

        self.estimate_card, est = card()
        head = QHBoxLayout()
        title = QLabel("Estimate")
        title.setObjectName("sectionHeader")
        head.addWidget(title)
        head.addStretch(1)
        self.estimate_busy = BusyIndicator()
        head.addWidget(self.estimate_busy)
        est.addLayout(head)
        self.estimate_label = QLabel("—")
        self.estimate_label.setWordWrap(True)
        self.estimate_label.setObjectName("cardTitle")
        self.estimate_detail = QLabel()
        self.estimate_detail.setWordWrap(True)
        self.estimate_detail.setObjectName("muted")
        self.estimate_warnings = QLabel()
        self.estimate_warnings.setWordWrap(True)
        self.estimate_warnings.setObjectName("warningText")
        for w in (self.estimate_label, self.estimate_detail, self.estimate_warnings):
            est.addWidget(w)
        est.addStretch(1)
        self.estimate_card.hide()  # until an estimate exists
        top.addWidget(self.estimate_card, 2)
        self.layout_.addLayout(top)

        bar = QHBoxLayout()
        self.advanced = QCheckBox("Show advanced settings")
        self.advanced.toggled.connect(self._show_advanced)
        bar.addWidget(self.advanced)
        bar.addStretch(1)
        self.problem_count = QLabel()
        self.problem_count.setObjectName("errorText")
        bar.addWidget(self.problem_count)
        self.layout_.addLayout(bar)

        # The fields, generated from the job's declarations.
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        inner = QWidget()
        columns = QHBoxLayout(inner)
        columns.setContentsMargins(0, 0, s, 0)
        columns.setSpacing(2 * s)
        left, right = QVBoxLayout(), QVBoxLayout()
        for c in (left, right):
            c.setSpacing(2 * s)
            columns.addLayout(c, 1)
        self.groups: dict[str, tuple[QGroupBox, QFormLayout]] = {}
        by_section: dict[str, list[config.FieldInfo]] = {}
        for info in model.fields():
            if page_for_field(info.path) == "settings":
                by_section.setdefault(info.path.split(".")[0], []).append(info)
        for i, section in enumerate(SECTION_ORDER):
            box = QGroupBox(SECTION_TITLES[section])
            form = QFormLayout(box)
            form.setHorizontalSpacing(2 * s)
            form.setVerticalSpacing(s)
            form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
            form.setContentsMargins(2 * s, 2 * s, 2 * s, 2 * s)
            # Simple settings first, advanced ones after them.
            for info in sorted(by_section.get(section, []), key=lambda f: f.advanced):
                editor = FieldEditor(info, model)
                self.editors[info.path] = editor
                form.addRow(editor.label, editor)
                form.addRow("", editor.error)
            self.groups[section] = (box, form)
            (left if section in ("lora", "training") else right).addWidget(box)
        left.addStretch(1)
        right.addStretch(1)
        scroll.setWidget(inner)
        self.layout_.addWidget(scroll, 1)

        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(300)
        self._estimate_timer.timeout.connect(self.refresh_estimate)
        model.changed.connect(self._on_changed)
        model.problems_changed.connect(self._on_problems)
        self.reload_presets()
        self._show_advanced(False)
        self._on_problems(model.problems())

    # -------------------------------------------------------------------------------------------- state

    def state(self) -> tuple[str, str]:
        errors = [p for p in self.model.errors() if p.field in self.editors]
        if errors:
            label = self.model.field(errors[0].field).label
            return ATTENTION, f"{label}: {errors[0].message}"
        return DONE, "Settings are ready."

    def editor(self, path: str) -> FieldEditor:
        return self.editors[path]

    # ------------------------------------------------------------------------------------------- presets

    def reload_presets(self, select: str = "") -> None:
        self.preset_combo.blockSignals(True)
        self.preset_combo.clear()
        self.preset_combo.addItem("Choose a preset…", None)
        for preset in presets.builtin_presets():
            self.preset_combo.addItem(preset.name, preset)
        mine = presets.user_presets()
        if mine:
            self.preset_combo.insertSeparator(self.preset_combo.count())
            for preset in mine:
                self.preset_combo.addItem(f"{preset.name} (yours)", preset)
        index = next((i for i in range(self.preset_combo.count())
                      if isinstance(p := self.preset_combo.itemData(i), presets.Preset) and p.name == select), 0)
        self.preset_combo.setCurrentIndex(index)
        self.preset_combo.blockSignals(False)
        self._describe_preset()

    def selected_preset(self) -> presets.Preset | None:
        data = self.preset_combo.currentData()
        return data if isinstance(data, presets.Preset) else None

    def _describe_preset(self) -> None:
        preset = self.selected_preset()
        self.apply_button.setEnabled(preset is not None)
        self.delete_preset_button.setEnabled(preset is not None and not preset.builtin)
        if preset is None:
            self.preset_description.setText("A preset sets rank, steps, learning rate and previews in one go; "
                                            "your images, model and names stay as they are.")
            return
        changes = ", ".join(f"{self.model.field(k).label.lower()} {_show(v)}" for k, v in list(preset.values.items())[:6])
        more = len(preset.values) - 6
        self.preset_description.setText(f"{preset.description} ({changes}{f', and {more} more' if more > 0 else ''})")

    def apply_selected_preset(self) -> None:
        preset = self.selected_preset()
        if preset is not None:
            self.apply_preset(preset)

    def apply_preset(self, preset: presets.Preset) -> None:
        self.model.apply(preset.values)

    def save_preset(self) -> None:
        name, ok = QInputDialog.getText(self, "Save as preset", "Name of the preset:")
        if ok and name.strip():
            presets.save_user_preset(name, self.model.job)
            self.reload_presets(select=name.strip())

    def delete_preset(self) -> None:
        preset = self.selected_preset()
        if preset is None or preset.builtin:
            return
        answer = QMessageBox.question(self, "Delete preset", f"Delete your preset “{preset.name}”?")
        if answer == QMessageBox.Yes:
            presets.delete_user_preset(preset)
            self.reload_presets()

    # ------------------------------------------------------------------------------------------ advanced

    def _show_advanced(self, shown: bool) -> None:
        for section, (box, form) in self.groups.items():
            visible_rows = 0
            for path, editor in self.editors.items():
                if not path.startswith(section + "."):
                    continue
                visible = shown or not editor.info.advanced
                form.setRowVisible(editor, visible)
                form.setRowVisible(editor.error, visible and bool(editor.error.text()))
                visible_rows += visible
            box.setVisible(visible_rows > 0)

    # ------------------------------------------------------------------------------------------ estimate

    def refresh_estimate(self) -> None:
        self.estimate_busy.start("")
        self.tasks.run("estimate", backend.estimate, self.model.snapshot(), engine=True, what="The estimate",
                       on_done=self._show_estimate, on_error=lambda m, d: self._show_estimate(None),
                       on_finished=self.estimate_busy.stop)

    def _show_estimate(self, estimate: Any) -> None:
        self.estimate = estimate
        if estimate is None:
            self.estimate_card.hide()
            return
        steps = self.model.value("training.steps")
        self.estimate_label.setText(_estimate_headline(estimate))
        detail = [f"{steps} steps"]
        device = getattr(estimate, "device", "")
        if device:
            detail.append(f"on {device}")
        if getattr(estimate, "preview_seconds", 0):
            detail.append(f"· previews about {format_duration(estimate.preview_seconds)} of it")
        if estimate.gpu_memory_bytes:
            total = getattr(estimate, "gpu_total_bytes", None)
            detail.append(f"· GPU memory about {format_bytes(estimate.gpu_memory_bytes)}"
                          + (f" of {format_bytes(total)}" if total else ""))
        accuracy = getattr(estimate, "accuracy", "")
        if accuracy:
            detail.append(f"· {accuracy}")
        self.estimate_detail.setText(" ".join(detail))
        warnings = list(getattr(estimate, "warnings", []) or [])
        self.estimate_warnings.setText("\n".join(w[0].upper() + w[1:] + ("" if w.endswith(".") else ".") for w in warnings))
        self.estimate_warnings.setVisible(bool(warnings))
        self.estimate_card.show()

    # ------------------------------------------------------------------------------------------ model

    def _on_changed(self, path: str, value: Any) -> None:
        if path.startswith(ESTIMATE_SECTIONS):
            self._estimate_timer.start()

    def _on_problems(self, problems: list) -> None:
        errors = [p for p in problems if p.severity == "error" and p.field in self.editors]
        self.problem_count.setText(f"{len(errors)} setting{'s' if len(errors) != 1 else ''} to fix" if errors else "")
        # An advanced field with a problem must be visible, or the user could not find what to fix.
        if errors and not self.advanced.isChecked() and any(self.editors[p.field].info.advanced for p in errors):
            self.advanced.setChecked(True)
        self._show_advanced(self.advanced.isChecked())
        self.state_changed.emit()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self.estimate is None and not self.tasks.is_running("estimate"):
            self._estimate_timer.start()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _estimate_headline(estimate: Any) -> str:
    """"About 0.31–0.52 s per step · 5–9 min in total": the range measured runs fell in on settings the estimate
    was not fitted on; a single figure where it is uncalibrated (no such measurements on this kind of device)."""
    span = estimate.seconds_range if getattr(estimate, "error_band", None) else None
    if span is None:
        return (f"About {format_step_time(estimate.seconds_per_step)} per step · "
                f"{format_duration(estimate.total_seconds)} in total")
    (step_lo, step_hi), (total_lo, total_hi) = span(estimate.seconds_per_step), span(estimate.total_seconds)
    return (f"About {format_step_time(step_lo)}–{format_step_time(step_hi)} per step · "
            f"{format_duration(total_lo)}–{format_duration(total_hi)} in total")
