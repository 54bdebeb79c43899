"""Export report panel: per consumer (A1111/Forge, ComfyUI, InvokeAI, kohya, diffusers) whether a LoRA file loads."""

from __future__ import annotations

import html

from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from studio.ui.pages.base import section_label

_MARKS = {"loads fully": "✓", "does not load": "✗"}


class ExportReportWidget(QWidget):
    """Shows the report ``studio.engine.inspection.file_report`` derives from the file's keys (the tests' conventions)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        self.heading = section_label("Where this file loads")
        col.addWidget(self.heading)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setObjectName("muted")
        col.addWidget(self.text)
        self.rows: list[dict[str, str]] = []
        self.set_report([])

    def set_report(self, consumers: list[dict[str, str]], problem: str | None = None) -> None:
        self.rows = list(consumers)
        lines = []
        if problem:
            lines.append(f"<b>Problem:</b> {html.escape(problem)}")
        for c in self.rows:
            mark = _MARKS.get(c["status"], "~")
            reason = f" — {html.escape(c['reason'])}" if c.get("reason") else ""
            lines.append(f"{mark} <b>{html.escape(c['consumer'])}</b>: {html.escape(c['status'])}{reason}")
        self.text.setText("<br>".join(lines))
        self.setVisible(bool(lines))

    def status(self, consumer: str) -> str | None:
        return next((c["status"] for c in self.rows if c["consumer"] == consumer), None)
