"""Field editors generated from the job's field metadata, bound to the JobModel in both directions."""

from __future__ import annotations

import math
import re
from typing import Any

from PySide6.QtCore import QRegularExpression, Signal
from PySide6.QtGui import QRegularExpressionValidator, QValidator
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QPushButton,
    QSpinBox, QWidget,
)

from studio.engine.config import FieldInfo
from studio.ui import theme
from studio.ui.job_model import JobModel

INT32_MAX = 2**31 - 1

# Fields holding a path get a Browse button; the value says what the dialog picks.
PATH_FIELDS = {
    "model.path": "model", "model.vae": "file", "model.config_dir": "folder", "dataset.path": "folder",
    "output.dir": "folder", "validation.folder": "folder",
}


class FloatSpinBox(QDoubleSpinBox):
    """Shows numbers as people write them (0.0001, 1e-05, 16) instead of a fixed number of decimals."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setDecimals(12)  # stored precision; display uses %g

    def textFromValue(self, value: float) -> str:
        return f"{value:g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text.removesuffix(self.suffix()).strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        body = text.removesuffix(self.suffix()).strip()
        try:
            value = float(body)
        except ValueError:
            if re.fullmatch(r"[-+]?(\d*\.?\d*([eE][-+]?\d*)?)?", body):
                return QValidator.Intermediate, text, pos
            return QValidator.Invalid, text, pos
        if self.minimum() <= value <= self.maximum():
            return QValidator.Acceptable, text, pos
        return QValidator.Intermediate, text, pos


def _step_for(info: FieldInfo) -> float:
    """Arrow-key step that suits the field's scale: 1e-5 for a learning rate, 1 for alpha, 0.01 for fractions."""
    if isinstance(info.default, float) and 0 < info.default < 1:
        return 10 ** math.floor(math.log10(info.default))
    if info.max is not None and info.max <= 1:
        return 0.01
    return 1.0 if info.max is None or info.max > 10 else 0.1


def format_repeats(value: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in value.items())


def parse_repeats(text: str) -> dict:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, number = part.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"write each folder as name = number, e.g. faces = 3 (not “{part}”)")
        try:
            out[name.strip()] = int(number.strip())
        except ValueError:
            raise ValueError(f"“{number.strip()}” is not a whole number") from None
    return out


class FieldEditor(QWidget):
    """One job field: its input widget (tooltip = the field's help), a label and an error line.

    The model is the only state: user edits go to :meth:`JobModel.set_value`, model changes come back through
    ``JobModel.changed``. Problems from ``validate(job)`` for this field show in :attr:`error`.
    """

    edited = Signal(str)  # path, after the user changed the value

    def __init__(self, info: FieldInfo, model: JobModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.info = info
        self.path = info.path
        self.model = model
        self._local_error = ""
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(theme.SPACING)
        self.input = self._make_input()
        self.input.setToolTip(info.help)
        self.input.setObjectName(f"field:{info.path}")
        self.input.setAccessibleName(info.label)
        self.input.setAccessibleDescription(info.help)
        row.addWidget(self.input, 1)
        self.browse: QPushButton | None = None
        if info.path in PATH_FIELDS:
            self.browse = QPushButton("Browse…")
            self.browse.setIcon(theme.icon("folder"))
            self.browse.clicked.connect(self._browse)
            row.addWidget(self.browse)
        self.label = QLabel(info.label)
        self.label.setToolTip(info.help)
        self.label.setBuddy(self.input)
        self.error = QLabel()
        self.error.setObjectName("fieldError")
        self.error.setWordWrap(True)
        self.error.hide()
        self._show_value(model.value(info.path))
        model.changed.connect(self._on_model_changed)
        model.problems_changed.connect(self._on_problems)
        self._on_problems(model.problems())

    # ------------------------------------------------------------------------------------------- state

    @property
    def problem_text(self) -> str:
        """What is flagged at this field right now ("" when nothing)."""
        return self.error.text() if not self.error.isHidden() else ""

    @property
    def flagged(self) -> bool:
        return bool(self.input.property("invalid"))

    # ------------------------------------------------------------------------------------- the widgets

    def _make_input(self) -> QWidget:
        info = self.info
        if info.type is bool:
            w = QCheckBox()
            w.toggled.connect(lambda v: self._commit(v))
            return w
        if info.choices:
            w = QComboBox()
            w.addItems(list(info.choices))
            w.currentTextChanged.connect(lambda v: self._commit(v))
            return w
        if info.type is int and (info.max is None or info.max <= INT32_MAX):
            w = QSpinBox()
            w.setRange(int(info.min if info.min is not None else -INT32_MAX), int(info.max if info.max is not None else INT32_MAX))
            if info.min == -1:  # -1 is a field's "auto" (e.g. sampling.every): say so instead of showing "-1"
                w.setSpecialValueText("auto")
            w.setKeyboardTracking(False)
            if info.unit:
                w.setSuffix(f" {info.unit}")
            if info.path in ("dataset.resolution", "sampling.width", "sampling.height"):
                w.setSingleStep(64)
            w.valueChanged.connect(lambda v: self._commit(v))
            return w
        if info.type is int:  # seeds go up to 2**32 - 1, beyond what QSpinBox holds
            w = QLineEdit()
            w.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{0,10}")))
            w.textEdited.connect(lambda t: self._commit(t) if t else self._set_local_error("enter a whole number"))
            return w
        if info.type is float:
            w = FloatSpinBox()
            w.setRange(info.min if info.min is not None else -1e12, info.max if info.max is not None else 1e12)
            w.setSingleStep(_step_for(info))
            w.setKeyboardTracking(False)
            if info.unit:
                w.setSuffix(f" {info.unit}")
            w.valueChanged.connect(lambda v: self._commit(v))
            return w
        if info.type is list:
            w = QPlainTextEdit()
            w.setPlaceholderText("One per line. Empty: the first captions of your images.")
            w.setTabChangesFocus(True)
            w.setFixedHeight(theme.em(w) * 4 + theme.SPACING)
            w.textChanged.connect(lambda: self._commit([line.strip() for line in w.toPlainText().splitlines() if line.strip()]))
            return w
        if info.type is dict:
            w = QLineEdit()
            w.setPlaceholderText("e.g. faces = 3, styles = 2")
            w.textEdited.connect(self._commit_repeats)
            return w
        w = QLineEdit()
        if info.path == "dataset.trigger_word":
            w.setPlaceholderText("e.g. sks_cat — leave empty for none")
        w.textEdited.connect(lambda t: self._commit(t))
        return w

    def _show_value(self, value: Any) -> None:
        w = self.input
        blocked = w.blockSignals(True)
        try:
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QComboBox):
                index = w.findText(str(value))
                if index < 0:  # a value from a file that is not a choice: show it so it can be flagged
                    w.addItem(str(value))
                    index = w.count() - 1
                w.setCurrentIndex(index)
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                w.setValue(value)
            elif isinstance(w, QPlainTextEdit):
                if [line.strip() for line in w.toPlainText().splitlines() if line.strip()] != list(value):
                    w.setPlainText("\n".join(value))
            elif isinstance(w, QLineEdit):
                text = format_repeats(value) if isinstance(value, dict) else str(value)
                if self.info.type is dict and _same_repeats(w.text(), value):
                    return  # keep what the user is typing ("faces = 3, " must not be reformatted away)
                if w.text() != text:
                    w.setText(text)
        finally:
            w.blockSignals(blocked)

    # ------------------------------------------------------------------------------------ both ways

    def _commit(self, value: Any) -> None:
        try:
            self.model.set_value(self.path, value)
        except ValueError as exc:
            self._set_local_error(str(exc))
            return
        self._set_local_error("")
        self.edited.emit(self.path)

    def _commit_repeats(self, text: str) -> None:
        try:
            value = parse_repeats(text)
        except ValueError as exc:
            self._set_local_error(str(exc))
            return
        self._commit(value)

    def _on_model_changed(self, path: str, value: Any) -> None:
        if path == self.path:
            self._local_error = ""
            self._show_value(value)
            self._on_problems(self.model.problems())

    def _set_local_error(self, text: str) -> None:
        self._local_error = text
        self._on_problems(self.model.problems())

    def _on_problems(self, problems: list) -> None:
        mine = [p for p in problems if p.field == self.path]
        if self._local_error:
            text, severity = self._local_error, "error"
        elif mine:
            worst = next((p for p in mine if p.severity == "error"), mine[0])
            text, severity = "; ".join(p.message for p in mine), worst.severity
        else:
            text, severity = "", ""
        self.error.setText(_sentence(text))
        self.error.setProperty("severity", severity)
        self.error.style().unpolish(self.error)
        self.error.style().polish(self.error)
        self.error.setVisible(bool(text) and not self.isHidden())
        for w in (self.input, self.label):
            w.setProperty("invalid", severity == "error")
            w.setProperty("warned", severity == "warning")
            w.style().unpolish(w)
            w.style().polish(w)

    def _browse(self) -> None:
        kind = PATH_FIELDS[self.path]
        current = str(self.model.value(self.path) or "")
        if kind == "folder":
            chosen = QFileDialog.getExistingDirectory(self, f"Choose {self.info.label.lower()}", current)
        elif kind == "model":
            chosen, _ = QFileDialog.getOpenFileName(self, "Choose a base model", current,
                                                    "Checkpoints (*.safetensors *.ckpt);;All files (*)")
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, f"Choose {self.info.label.lower()}", current,
                                                    "Safetensors (*.safetensors);;All files (*)")
        if chosen:
            self._show_value(chosen)
            self._commit(chosen)


def _same_repeats(text: str, value: dict) -> bool:
    try:
        return parse_repeats(text) == value
    except ValueError:
        return False


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."
