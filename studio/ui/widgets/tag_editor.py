"""TagEditorPanel: the dataset's tags by frequency, with bulk add / remove / replace / move-to-front and Undo.

The panel shows and asks; the Dataset page does the edits (in the background) and refills it after each one.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout, QHeaderView, QInputDialog, QLabel, QLineEdit, QPushButton, QTreeWidget, QTreeWidgetItem, QVBoxLayout,
    QWidget,
)

from studio.ui import theme


class TagEditorPanel(QWidget):
    """Emits what the user asked for; the page applies it to every caption file and can undo it."""

    add_requested = Signal(str, bool)  # tag, at the front
    remove_requested = Signal(str)
    replace_requested = Signal(str, str)  # old, new
    front_requested = Signal(str)
    trigger_requested = Signal()
    undo_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        s = theme.SPACING
        col = QVBoxLayout(self)
        col.setContentsMargins(0, s, 0, 0)
        col.setSpacing(s)
        top = QHBoxLayout()
        top.setSpacing(s)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter tags…")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self._apply_filter)
        top.addWidget(self.filter, 1)
        self.note = QLabel()
        self.note.setObjectName("muted")
        top.addWidget(self.note)
        col.addLayout(top)

        self.table = QTreeWidget()
        self.table.setHeaderLabels(["Tag", "Images"])
        self.table.setRootIsDecorated(False)
        self.table.setSortingEnabled(False)
        self.table.header().setStretchLastSection(False)
        self.table.header().setSectionResizeMode(0, QHeaderView.Stretch)
        self.table.setToolTip("How many images have each tag (as trained: the trigger word is counted where it is "
                              "added). Select a tag to change it in every caption.")
        self.table.itemSelectionChanged.connect(self._update_buttons)
        col.addWidget(self.table, 1)

        row = QHBoxLayout()
        row.setSpacing(s)
        self.add_button = QPushButton("Add tag…")
        self.add_button.setToolTip("Add a tag to every caption that does not have it yet.")
        self.add_button.clicked.connect(self._ask_add)
        self.replace_button = QPushButton("Replace…")
        self.replace_button.setToolTip("Replace the selected tag with another one in every caption.")
        self.replace_button.clicked.connect(self._ask_replace)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Remove the selected tag from every caption.")
        self.remove_button.clicked.connect(lambda: self.selected_tag() and self.remove_requested.emit(self.selected_tag()))
        self.front_button = QPushButton("Move to front")
        self.front_button.setToolTip("Put the selected tag first in every caption that has it (keep_tokens keeps "
                                     "the first tags in place when tags are shuffled).")
        self.front_button.clicked.connect(lambda: self.selected_tag() and self.front_requested.emit(self.selected_tag()))
        self.trigger_button = QPushButton("Insert trigger word")
        self.trigger_button.setToolTip("Write the trigger word first into every caption file that lacks it.")
        self.trigger_button.clicked.connect(self.trigger_requested.emit)
        self.undo_button = QPushButton(theme.icon("refresh"), "Undo")
        self.undo_button.clicked.connect(self.undo_requested.emit)
        for b in (self.add_button, self.replace_button, self.remove_button, self.front_button, self.trigger_button):
            row.addWidget(b)
        row.addStretch(1)
        row.addWidget(self.undo_button)
        col.addLayout(row)
        self.set_undo("")
        self._update_buttons()

    # ----------------------------------------------------------------------------------------------- view

    def fill(self, counts: list[tuple[str, int]], trained_only: set[str] = frozenset()) -> None:
        """``counts``: (tag, images), most frequent first; ``trained_only``: tags no caption file has (the trigger)."""
        selected = self.selected_tag()
        self.table.clear()
        for tag, n in counts:
            row = QTreeWidgetItem([tag, str(n)])
            row.setTextAlignment(1, Qt.AlignRight | Qt.AlignVCenter)
            if tag in trained_only:
                font = row.font(0)
                font.setItalic(True)
                row.setFont(0, font)
                row.setToolTip(0, "Added to every caption when training (the trigger word); not in the caption files.")
            self.table.addTopLevelItem(row)
            if tag == selected:
                row.setSelected(True)
        self.note.setText(f"{len(counts)} tags")
        self._apply_filter()
        self._update_buttons()

    def selected_tag(self) -> str:
        items = self.table.selectedItems()
        return items[0].text(0) if items else ""

    def select_tag(self, tag: str) -> bool:
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            if item.text(0) == tag:
                self.table.setCurrentItem(item)
                return True
        return False

    def set_undo(self, label: str) -> None:
        self.undo_button.setEnabled(bool(label))
        self.undo_button.setText(f"Undo: {label}" if label else "Undo")
        self.undo_button.setToolTip(f"Put back every caption file as it was before “{label}”." if label
                                    else "Nothing to undo.")

    def set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = getattr(self, "_busy", False)
        has = bool(self.selected_tag())
        for b in (self.replace_button, self.remove_button, self.front_button):
            b.setEnabled(has and not busy)
        self.add_button.setEnabled(not busy)
        self.trigger_button.setEnabled(not busy)

    def _apply_filter(self) -> None:
        text = self.filter.text().strip().casefold()
        for i in range(self.table.topLevelItemCount()):
            item = self.table.topLevelItem(i)
            item.setHidden(bool(text) and text not in item.text(0).casefold())

    # ---------------------------------------------------------------------------------------------- asks

    def _ask_add(self) -> None:
        tag, ok = QInputDialog.getText(self, "Add a tag", "Tag to add to every caption (at the end):")
        if ok and tag.strip():
            self.add_requested.emit(tag.strip(), False)

    def _ask_replace(self) -> None:
        old = self.selected_tag()
        if not old:
            return
        new, ok = QInputDialog.getText(self, "Replace a tag", f"Replace “{old}” in every caption with:", text=old)
        if ok and new.strip() and new.strip() != old:
            self.replace_requested.emit(old, new.strip())
