"""CaptionDialog: pick a tagger or captioner, set its options, propose captions in the background, check them
row by row, and write the accepted ones (old text backed up, existing captions changed only after a yes)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDialog, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
    QHeaderView, QLabel, QLineEdit, QMessageBox, QProgressBar, QPushButton, QSizePolicy, QSpinBox, QTableWidget,
    QTableWidgetItem, QVBoxLayout, QWidget,
)

from studio.engine.captioning.events import (
    CaptioningCancelled, CaptioningFailed, CaptioningFinished, CaptioningStarted, CaptionProposed, CaptionSkipped,
    CaptionStatus, Proposal,
)
from studio.engine.captioning.options import KIND_LABELS, CaptionOptions, option_fields
from studio.ui import caption_backend, theme
from studio.ui.format import plural
from studio.ui.pages.base import card
from studio.ui.widgets.banner import Banner

log = logging.getLogger(__name__)

USE, IMAGE, CURRENT, PROPOSED = range(4)
PROPOSAL_ROLE = Qt.UserRole
TAGGER_ONLY = {"general_threshold", "character_threshold", "characters", "rating", "exclude_tags",
               "underscores_to_spaces", "max_tags"}
GENERATIVE_ONLY = {"max_tokens", "beams"}
FLORENCE_ONLY = {"florence_task"}


@dataclasses.dataclass
class ModelEntry:
    ref: str  # hub id or folder
    kind: str
    label: str
    on_disk: bool
    note: str = ""


class CaptionDialog(QDialog):
    """Non-blocking: every model load, caption run, download and write runs in the page's background tasks."""

    captions_written = Signal(object)  # studio.engine.captioning.WriteResult

    def __init__(self, dataset: Path, caption_extension: str, trigger_word: str, tasks: Any,
                 thumbs: dict[Path, QPixmap] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Caption images")
        self.dataset = Path(dataset)
        self.caption_extension = caption_extension
        self.tasks = tasks
        self.thumbs = thumbs or {}
        self.entries: list[ModelEntry] = []
        self.extra_folders: list[Path] = []
        self.running = False
        self._stop = threading.Event()
        s = theme.SPACING
        em = theme.em(self)
        self.resize(em * 70, em * 46)
        col = QVBoxLayout(self)
        col.setSpacing(2 * s)

        intro = QLabel(f"Propose a caption for each image in <b>{self.dataset.name}</b>. Nothing is written until you "
                       "check the proposals and press <i>Write</i>; changed captions are backed up first.")
        intro.setWordWrap(True)
        col.addWidget(intro)
        self.banner = Banner()
        col.addWidget(self.banner)

        top, top_layout = card()
        model_row = QHBoxLayout()
        model_row.setSpacing(s)
        model_row.addWidget(QLabel("Model"))
        self.model_box = QComboBox()
        self.model_box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.model_box.setToolTip("Models found on this computer (Hugging Face cache) come first; the others can be "
                                  "downloaded once, after you agree.")
        self.model_box.currentIndexChanged.connect(self._on_model_chosen)
        model_row.addWidget(self.model_box, 1)
        self.folder_button = QPushButton(theme.icon("folder"), "Folder…")
        self.folder_button.setToolTip("Use a model folder: model.onnx + selected_tags.csv (WD14), or a BLIP / Florence-2 "
                                      "folder with config.json.")
        self.folder_button.clicked.connect(self.browse_folder)
        model_row.addWidget(self.folder_button)
        top_layout.addLayout(model_row)
        self.model_note = QLabel()
        self.model_note.setObjectName("muted")
        self.model_note.setWordWrap(True)
        top_layout.addWidget(self.model_note)

        form = QFormLayout()
        form.setHorizontalSpacing(2 * s)
        form.setVerticalSpacing(s)
        self.option_widgets: dict[str, QWidget] = {}
        self.option_labels: dict[str, QLabel] = {}
        defaults = CaptionOptions(prefix=trigger_word)
        for name, f in option_fields():
            if f.metadata.get("advanced") and name not in ("beams",):
                continue
            widget = self._make_option(name, f.metadata, getattr(defaults, name))
            label = QLabel(f.metadata.get("label") or name)
            label.setToolTip(f.metadata["help"])
            form.addRow(label, widget)
            self.option_widgets[name], self.option_labels[name] = widget, label
        top_layout.addLayout(form)
        col.addWidget(top)

        run_row = QHBoxLayout()
        run_row.setSpacing(s)
        self.run_button = QPushButton(theme.icon("wand"), "Propose captions")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton(theme.icon("stop"), "Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.status = QLabel("Choose a model and press Propose captions.")
        self.status.setObjectName("muted")
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        run_row.addWidget(self.progress, 1)
        run_row.addStretch(0 if self.progress.isVisible() else 1)
        for b in (self.run_button, self.cancel_button):
            b.setSizePolicy(QSizePolicy.Maximum, QSizePolicy.Fixed)
        col.addLayout(run_row)
        col.addWidget(self.status)

        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Use", "Image", "Caption now", "Proposed caption (double-click to edit)"])
        self.table.setWordWrap(True)
        self.table.verticalHeader().hide()
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(USE, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(IMAGE, QHeaderView.Interactive)
        header.setSectionResizeMode(CURRENT, QHeaderView.Stretch)
        header.setSectionResizeMode(PROPOSED, QHeaderView.Stretch)
        self.table.setColumnWidth(IMAGE, em * 10)
        self.table.itemChanged.connect(lambda _: self._update_write_button())
        col.addWidget(self.table, 1)

        bottom = QHBoxLayout()
        bottom.setSpacing(s)
        self.accept_all_button = QPushButton("Use all")
        self.accept_all_button.clicked.connect(lambda: self.set_all_checked(True))
        self.reject_all_button = QPushButton("Use none")
        self.reject_all_button.clicked.connect(lambda: self.set_all_checked(False))
        self.write_button = QPushButton(theme.icon("save"), "Write captions")
        self.write_button.clicked.connect(self.write_selected)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        bottom.addWidget(self.accept_all_button)
        bottom.addWidget(self.reject_all_button)
        bottom.addStretch(1)
        bottom.addWidget(self.write_button)
        bottom.addWidget(self.close_button)
        col.addLayout(bottom)
        self._update_write_button()
        self.refresh_models()

    # ------------------------------------------------------------------------------------------- options

    def _make_option(self, name: str, meta: dict, value: Any) -> QWidget:
        if meta.get("choices"):
            w = QComboBox()
            for choice in meta["choices"]:
                w.addItem(choice, choice)
            w.setCurrentIndex(w.findData(value))
        elif isinstance(value, bool):
            w = QCheckBox()
            w.setChecked(value)
        elif isinstance(value, float):
            w = QDoubleSpinBox()
            w.setRange(meta["min"], meta["max"])
            w.setSingleStep(0.05)
            w.setDecimals(2)
            w.setValue(value)
        elif isinstance(value, int):
            w = QSpinBox()
            w.setRange(int(meta["min"]), int(meta["max"]))
            if meta.get("unit"):
                w.setSuffix(f" {meta['unit']}")
            if name == "max_tags":
                w.setSpecialValueText("no limit")
            w.setValue(value)
        else:
            w = QLineEdit(value)
        w.setToolTip(meta["help"])
        return w

    def options(self) -> CaptionOptions:
        values = {}
        for name, w in self.option_widgets.items():
            if isinstance(w, QComboBox):
                values[name] = w.currentData()
            elif isinstance(w, QCheckBox):
                values[name] = w.isChecked()
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                values[name] = w.value()
            else:
                values[name] = w.text().strip()
        return CaptionOptions(**values)

    def set_option(self, name: str, value: Any) -> None:
        w = self.option_widgets[name]
        if isinstance(w, QComboBox):
            w.setCurrentIndex(w.findData(value))
        elif isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
            w.setValue(value)
        else:
            w.setText(str(value))

    def _show_options_for(self, kind: str) -> None:
        for name, w in self.option_widgets.items():
            visible = not ((name in TAGGER_ONLY and kind != "tagger") or (name in GENERATIVE_ONLY and kind == "tagger")
                           or (name in FLORENCE_ONLY and kind != "florence2"))
            w.setVisible(visible)
            self.option_labels[name].setVisible(visible)

    # -------------------------------------------------------------------------------------------- models

    def refresh_models(self, select: str = "") -> None:
        self.model_note.setText("Looking for captioning models on this computer…")
        self.tasks.run("caption-models", caption_backend.find_caption_models, list(self.extra_folders),
                       what="Looking for captioning models", on_done=lambda found: self._on_models(found, select),
                       on_error=lambda msg, details: self.model_note.setText(msg))

    def _on_models(self, found: list, select: str = "") -> None:
        from studio.engine.captioning.hub import format_bytes
        from studio.engine.captioning.models import CATALOG

        current = select or (self.current_entry().ref if self.current_entry() else "")
        entries = [ModelEntry(m.ref, m.kind, m.label, True, f"on this computer, {format_bytes(m.size_bytes)}")
                   for m in found]
        have = {e.ref for e in entries}
        entries += [ModelEntry(s.id, s.kind, s.label, False, f"not on this computer; can be downloaded "
                               f"({'about ' if not s.exact else ''}{format_bytes(s.approx_bytes)}): {s.note}")
                    for s in CATALOG if s.id not in have]
        self.entries = entries
        self.model_box.blockSignals(True)
        self.model_box.clear()
        for e in entries:
            mark = "" if e.on_disk else "  ⤓ download"
            self.model_box.addItem(theme.icon("state-done" if e.on_disk else "state-pending"),
                                   f"{e.label} — {KIND_LABELS[e.kind]}{mark}", e.ref)
        index = next((i for i, e in enumerate(entries) if e.ref == current), 0)
        self.model_box.setCurrentIndex(index)
        self.model_box.blockSignals(False)
        self._on_model_chosen()

    def current_entry(self) -> ModelEntry | None:
        i = self.model_box.currentIndex()
        return self.entries[i] if 0 <= i < len(self.entries) else None

    def _on_model_chosen(self) -> None:
        entry = self.current_entry()
        if entry is None:
            self.model_note.setText("")
            return
        self.model_note.setText(f"{entry.ref}: {entry.note}")
        self._show_options_for(entry.kind)
        self.run_button.setText("Propose captions" if entry.on_disk else "Download and propose…")

    def browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose the captioning model's folder", str(Path.home()))
        if path:
            self.add_model_folder(Path(path))

    def add_model_folder(self, folder: Path) -> bool:
        """Offer ``folder`` in the list (chosen); False (and a sentence) when it holds no captioning model."""
        kind = caption_backend.identify_folder(folder)
        if kind is None:
            self.banner.show_message("error", f"“{folder}” holds no captioning model: a WD14 tagger folder has "
                                              "model.onnx and selected_tags.csv, a BLIP or Florence-2 folder has "
                                              "config.json. Choose another folder.")
            return False
        self.banner.hide()
        if folder not in self.extra_folders:
            self.extra_folders.append(folder)
        self.refresh_models(select=str(folder))
        return True

    # ------------------------------------------------------------------------------------------- running

    def confirm(self, title: str, text: str) -> bool:
        """Ask yes/no (tests replace this)."""
        return QMessageBox.question(self, title, text, QMessageBox.Yes | QMessageBox.No, QMessageBox.No) == QMessageBox.Yes

    def start(self) -> None:
        entry = self.current_entry()
        if entry is None or self.running:
            return
        if not entry.on_disk:
            self._offer_download(entry)
            return
        from studio.engine.captioning import CaptionRequest

        request = CaptionRequest(self.dataset, entry.ref, entry.kind, self.options(), self.caption_extension)
        self.banner.hide()
        self.table.setRowCount(0)
        self._stop = threading.Event()
        self._set_running(True, "Starting…")
        self.tasks.run("caption", caption_backend.caption_dataset, request, self._stop, progress=True,
                       stoppable=True, engine=True, what="Captioning", on_progress=self._on_event,
                       on_error=self._on_error, on_finished=lambda: self._set_running(False))

    def cancel(self) -> None:
        """Stop after the current batch; the proposals made so far stay for checking."""
        if self.tasks.is_running("caption-download"):
            self.tasks.cancel("caption-download")
            self._set_running(False, "Download stopped; what was fetched is kept and resumed next time.")
            return
        self._stop.set()
        self.status.setText("Stopping after the current images…")

    def _set_running(self, running: bool, text: str = "") -> None:
        self.running = running
        self.run_button.setEnabled(not running)
        self.model_box.setEnabled(not running)
        self.folder_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        if running:
            self.progress.setRange(0, 0)
        if text:
            self.status.setText(text)
        self._update_write_button()

    def _on_event(self, event: object) -> None:
        match event:
            case CaptionStatus(phase=phase):
                self.status.setText(f"{phase}…")
            case CaptioningStarted(total=total, description=description):
                self.progress.setRange(0, total)
                self.progress.setValue(0)
                self.progress.setFormat(f"%v / {total}")
                self.status.setText(f"{description}: captioning {plural(total, 'image')}…")
            case CaptionProposed(index=i, proposal=proposal):
                self._add_proposal(proposal)
                self.progress.setValue(i)
            case CaptionSkipped(rel=rel, reason=reason, severity=severity):
                self._add_skipped(rel, reason, severity)
            case CaptioningFinished(proposed=n, skipped=skipped, seconds_per_image=spi):
                extra = f", {plural(skipped, 'image')} skipped (see the list)" if skipped else ""
                speed = f" ({spi * 1000:.0f} ms per image)" if n else ""
                self.status.setText(f"{plural(n, 'caption')} proposed{speed}{extra}. Check them, then press Write.")
            case CaptioningFailed(message=message, details=details):
                self.banner.show_message("error", message, details)
                self.status.setText("Captioning failed; nothing was written.")
            case CaptioningCancelled(proposed=n):
                self.status.setText(f"Stopped after {plural(n, 'image')}; those proposals are kept below. "
                                    "Nothing was written.")
            case _:
                log.warning("unknown captioning event %r", event)

    def _on_error(self, message: str, details: str) -> None:
        self.banner.show_message("error", message, details)

    def _add_proposal(self, p: Proposal) -> None:
        self.table.blockSignals(True)
        row = self.table.rowCount()
        self.table.insertRow(row)
        use = QTableWidgetItem()
        use.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
        use.setCheckState(Qt.Checked)
        use.setData(PROPOSAL_ROLE, p)
        image = QTableWidgetItem(p.rel)
        image.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
        pixmap = self.thumbs.get(p.image_path)
        if pixmap is not None:
            image.setIcon(pixmap)
        current = QTableWidgetItem(p.current or "(no caption)")
        current.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable)
        if not p.current:
            current.setForeground(self.palette().placeholderText())
        proposed = QTableWidgetItem(p.proposed)
        proposed.setFlags(Qt.ItemIsEnabled | Qt.ItemIsSelectable | Qt.ItemIsEditable)
        if p.overwrites:
            use.setToolTip("Writing this replaces the caption it has now (the old text is backed up).")
            current.setIcon(theme.icon("warning"))
        for c, item in enumerate((use, image, current, proposed)):
            self.table.setItem(row, c, item)
        self.table.blockSignals(False)
        self.table.resizeRowToContents(row)
        self._update_write_button()

    def _add_skipped(self, rel: str, reason: str, severity: str) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        cells = [QTableWidgetItem(), QTableWidgetItem(rel), QTableWidgetItem(""), QTableWidgetItem(reason)]
        cells[1].setIcon(theme.icon("warning" if severity == "warning" else "info"))
        for c, item in enumerate(cells):
            item.setFlags(Qt.ItemIsEnabled)
            item.setForeground(self.palette().placeholderText())
            self.table.setItem(row, c, item)

    # ------------------------------------------------------------------------------------------- writing

    def rows(self) -> list[tuple[int, Proposal]]:
        out = []
        for row in range(self.table.rowCount()):
            item = self.table.item(row, USE)
            p = item.data(PROPOSAL_ROLE) if item is not None else None
            if p is not None:
                out.append((row, p))
        return out

    def checked_proposals(self) -> list[Proposal]:
        """The rows to write, with the proposed text as (maybe) edited in the table."""
        chosen = []
        for row, p in self.rows():
            if self.table.item(row, USE).checkState() == Qt.Checked:
                chosen.append(dataclasses.replace(p, proposed=self.table.item(row, PROPOSED).text().strip()))
        return chosen

    def set_all_checked(self, checked: bool) -> None:
        for row, _ in self.rows():
            item = self.table.item(row, USE)
            if item.flags() & Qt.ItemIsEnabled:
                item.setCheckState(Qt.Checked if checked else Qt.Unchecked)

    def _update_write_button(self) -> None:
        n = len(self.checked_proposals()) if hasattr(self, "table") else 0
        self.write_button.setText(f"Write {plural(n, 'caption')}" if n else "Write captions")
        self.write_button.setEnabled(bool(n) and not self.running and not self.tasks.is_running("caption-write"))

    def write_selected(self) -> None:
        proposals = self.checked_proposals()
        if not proposals:
            return
        changing = [p for p in proposals if p.overwrites]
        if changing and not self.confirm(
                "Change existing captions?",
                f"{plural(len(changing), 'image already has a caption', 'images already have a caption')} that "
                f"would be replaced or extended. Write anyway?\n\nThe old text is copied to "
                f"{self.dataset / '.lora-studio' / 'caption-backups'} first, and Undo on the Tags tab puts it back."):
            return
        self.write_button.setEnabled(False)
        self.status.setText(f"Writing {plural(len(proposals), 'caption')}…")
        self.tasks.run("caption-write", caption_backend.write_captions, self.dataset, proposals, bool(changing),
                       what="Writing captions", on_done=self._on_written, on_error=self._on_error,
                       on_finished=self._update_write_button)

    def _on_written(self, result: Any) -> None:
        written = {Path(p) for p in result.written}
        for row, p in self.rows():
            if p.caption_path in written:
                for c in range(4):
                    item = self.table.item(row, c)
                    item.setFlags(item.flags() & ~Qt.ItemIsEditable & ~Qt.ItemIsUserCheckable)
                self.table.item(row, USE).setData(PROPOSAL_ROLE, None)
                self.table.item(row, USE).setText("written")
        failed = "; ".join(f"{Path(p).name}: {why}" for p, why in result.edit.failed)
        backup = f" Old text backed up to {result.backup_dir}." if result.backup_dir else ""
        self.status.setText(f"Wrote {plural(len(result.written), 'caption file')}.{backup}")
        if failed:
            self.banner.show_message("error", f"Some captions could not be written: {failed}")
        self.captions_written.emit(result)

    # ------------------------------------------------------------------------------------------ download

    def _offer_download(self, entry: ModelEntry) -> None:
        self._set_running(True, f"Asking the Hugging Face hub how large {entry.label} is…")
        self.tasks.run("caption-offer", caption_backend.download_offer, entry.ref, what="Checking the download",
                       on_done=self._on_offer, on_error=self._on_error, on_finished=lambda: self._set_running(False))

    def _on_offer(self, offer: Any) -> None:
        from studio.engine.captioning.hub import format_bytes
        from studio.engine.checkpoint import hf_hub_cache

        size = ("about " if not offer.exact else "") + format_bytes(offer.total_bytes)
        files = "".join(f"\n  {name} ({format_bytes(n)})" for name, n in offer.files)
        where = "as the hub lists it now" if offer.source == "hub" else "the hub could not be asked; LoRA Studio's estimate"
        text = (f"{offer.label} ({offer.model_id}) is not on this computer.\n\nDownload {size} ({where}) from the "
                f"Hugging Face hub?{files}\n\nIt is saved in the Hugging Face cache ({hf_hub_cache()}) and used "
                "offline from then on. This is the only download LoRA Studio ever makes.")
        self._set_running(False)
        if not self.confirm("Download a captioning model?", text):
            self.status.setText("Nothing was downloaded.")
            return
        self._set_running(True, f"Downloading {offer.label} ({size})…")
        self.progress.setRange(0, 1000)
        self.tasks.run("caption-download", caption_backend.download_model, offer, progress=True, stoppable=True,
                       what="Downloading the model", on_progress=self._on_download_progress,
                       on_done=lambda folder: self._on_downloaded(offer), on_error=self._on_error,
                       on_finished=lambda: self._set_running(False) if not self.tasks.is_running("caption") else None)

    def _on_download_progress(self, value: tuple[int, int]) -> None:
        from studio.engine.captioning.hub import format_bytes

        done, total = value
        self.progress.setValue(int(1000 * done / max(total, 1)))
        self.progress.setFormat(f"{format_bytes(done)} / {format_bytes(total)}")

    def _on_downloaded(self, offer: Any) -> None:
        self.status.setText(f"{offer.label} is downloaded.")
        self.refresh_models(select=offer.model_id)

    # ------------------------------------------------------------------------------------------ closing

    def done(self, result: int) -> None:
        # Closing never waits for the model: the run is asked to stop and ends on its own thread.
        self._stop.set()
        self.tasks.cancel("caption-download")
        super().done(result)


def open_caption_dialog(parent: QWidget, **kwargs: Any) -> CaptionDialog:
    dialog = CaptionDialog(parent=parent, **kwargs)
    dialog.setAttribute(Qt.WA_DeleteOnClose, False)
    dialog.setWindowModality(Qt.WindowModal)
    dialog.show()
    return dialog

