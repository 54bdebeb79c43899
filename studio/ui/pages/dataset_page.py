"""Dataset page: drop a folder of captioned images; see thumbnails, edit captions, repeats, problems, tags, buckets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QFileDialog, QFormLayout, QHBoxLayout, QHeaderView, QLabel, QListView, QListWidget,
    QListWidgetItem, QProgressBar, QPushButton, QSpinBox, QStackedWidget, QTabWidget, QTreeWidget, QTreeWidgetItem,
    QVBoxLayout, QWidget,
)

from studio.ui import backend, caption_backend, theme
from studio.ui.format import plural
from studio.ui.images import pil_to_pixmap
from studio.ui.job_model import JobModel
from studio.ui.pages.base import ATTENTION, DONE, PENDING, Page, card, page_for_field
from studio.ui.widgets.banner import Banner
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.caption_dialog import CaptionDialog
from studio.ui.widgets.drop_zone import DropZone, folder_only
from studio.ui.widgets.fields import FieldEditor
from studio.ui.widgets.tag_editor import TagEditorPanel

PATH_ROLE = Qt.UserRole
CAPTION_ROLE = Qt.UserRole + 1
# Changes to these fields change what the scan reports; a short pause lets typing finish first.
RESCAN_FIELDS = {"dataset.path", "dataset.caption_extension", "dataset.trigger_word", "dataset.repeats",
                 "dataset.default_repeats"}
BUCKET_FIELDS = {"dataset.resolution", "dataset.bucket_step", "dataset.buckets"}
SEVERITY_ICONS = {"error": "error", "warning": "warning", "info": "info"}


class DatasetPage(Page):
    title = "Dataset"
    icon_name = "dataset"
    purpose = "Pictures of what the LoRA should learn, each with a caption saying what is in it."
    help_html = (
        "<p>Put 10–50 good images of your subject or style in one folder. Next to each image, a <b>.txt</b> file "
        "with the same name holds its caption (<i>photo of sks_dog on a beach</i>). Captions describe what "
        "should <i>not</i> stick to the trigger word.</p>"
        "<p>The <b>trigger word</b> is added to every caption; use it in prompts to call up what you trained.</p>"
        "<p>Sub-folders can be weighted with <b>repeats</b> (kohya's <i>10_name</i> folders work too). The "
        "<b>Problems</b> tab lists every file that is skipped or looks wrong, and what happens to it; "
        "<b>Buckets</b> shows how images are grouped by shape instead of being cropped square.</p>"
        "<p>Double-click a caption to edit it; it is saved to its .txt file when you press Enter.</p>"
        "<p><b>Caption…</b> proposes captions with a WD14 tagger, BLIP or Florence-2 running on your computer; "
        "you check them before anything is written. The <b>Tags</b> tab changes a tag in every caption at once "
        "(add, remove, replace, move to the front) and can undo each change.</p>")

    def __init__(self, model: JobModel, tasks, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.tasks = tasks
        self.scan: backend.DatasetScan | None = None
        self.scan_error = ""
        self._thumbs: dict[Path, QPixmap] = {}
        self._items: dict[Path, QListWidgetItem] = {}
        from studio.engine.captioning.bulk_edit import UndoJournal

        self.journal = UndoJournal()  # bulk edits and written captions of this folder, newest last
        self.caption_dialog: CaptionDialog | None = None
        s = theme.SPACING

        self.stack = QStackedWidget()
        self.layout_.addWidget(self.stack, 1)

        # Empty state: the big drop zone.
        self.drop = DropZone(
            "Drop your image folder here",
            "A folder of images (PNG, JPG, WebP) with a caption in a .txt file of the same name next to each. "
            "Images are only read; captions change only when you edit them here.",
            icon="dataset", check=folder_only)
        self.drop.add_button(QPushButton(theme.icon("folder"), "Choose folder…")).clicked.connect(self.browse)
        self.drop.add_button(QPushButton(theme.icon("sparkle"), "Use the demo images")).clicked.connect(
            self.use_demo_images)
        self.drop.dropped.connect(self.choose)
        self.stack.addWidget(self.drop)

        # Loaded state.
        loaded = QWidget()
        col = QVBoxLayout(loaded)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(2 * s)
        self.stack.addWidget(loaded)

        self.bar = DropZone("", "", icon="folder", check=folder_only, compact=True)
        self.bar.dropped.connect(self.choose)
        self.bar.add_button(QPushButton("Change…")).clicked.connect(self.browse)
        self.rescan_button = self.bar.add_button(QPushButton(theme.icon("refresh"), "Check again"))
        self.rescan_button.clicked.connect(self.rescan)
        col.addWidget(self.bar)

        self.banner = Banner(closable=False)
        col.addWidget(self.banner)

        top, top_layout = card()
        row = QHBoxLayout()
        row.setSpacing(2 * s)
        self.summary = QLabel()
        self.summary.setObjectName("cardTitle")
        self.summary.setWordWrap(True)
        self.busy = BusyIndicator()
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(theme.em(self) // 2)
        self.progress.hide()
        row.addWidget(self.summary, 1)
        row.addWidget(self.busy)
        self.caption_button = QPushButton(theme.icon("wand"), "Caption…")
        self.caption_button.setToolTip("Propose captions with a tagger or captioner model, check them, then write them.")
        self.caption_button.clicked.connect(self.open_caption_dialog)
        row.addWidget(self.caption_button)
        top_layout.addLayout(row)
        top_layout.addWidget(self.progress)
        form = QFormLayout()
        form.setHorizontalSpacing(2 * s)
        form.setVerticalSpacing(s)
        self.trigger = FieldEditor(model.field("dataset.trigger_word"), model)
        form.addRow(self.trigger.label, self.trigger)
        form.addRow("", self.trigger.error)
        self.repeats_box = QWidget()
        self.repeats_layout = QHBoxLayout(self.repeats_box)
        self.repeats_layout.setContentsMargins(0, 0, 0, 0)
        self.repeats_layout.setSpacing(2 * s)
        repeats_label = QLabel("Repeats")
        repeats_label.setToolTip(model.field("dataset.repeats").help)
        form.addRow(repeats_label, self.repeats_box)
        self.repeat_spins: dict[str, QSpinBox] = {}
        top_layout.addLayout(form)
        col.addWidget(top)

        self.tabs = QTabWidget()
        col.addWidget(self.tabs, 1)
        self.grid = QListWidget()
        self.grid.setViewMode(QListView.IconMode)
        self.grid.setResizeMode(QListView.Adjust)
        self.grid.setMovement(QListView.Static)
        self.grid.setWordWrap(True)
        self.grid.setUniformItemSizes(True)
        self.grid.setSpacing(s)
        self.grid.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed
                                  | QAbstractItemView.SelectedClicked)
        self.grid.setToolTip("Double-click a caption to edit it. It is saved to the image's caption file.")
        self.grid.itemChanged.connect(self._on_item_changed)
        self._size_grid()
        self.tabs.addTab(self.grid, theme.icon("image"), "Images")
        self.problems = QTreeWidget()
        self.problems.setHeaderLabels(["File", "Problem", "What happens"])
        self.problems.setRootIsDecorated(False)
        self.problems.setWordWrap(True)
        self.problems.header().setSectionResizeMode(QHeaderView.Interactive)
        self.problems.header().setStretchLastSection(True)
        self.tabs.addTab(self.problems, "Problems")
        self.tag_panel = TagEditorPanel()
        self.tags = self.tag_panel.table
        self.tag_panel.add_requested.connect(self.add_tag)
        self.tag_panel.remove_requested.connect(self.remove_tag)
        self.tag_panel.replace_requested.connect(self.replace_tag)
        self.tag_panel.front_requested.connect(self.move_tag_to_front)
        self.tag_panel.trigger_requested.connect(self.insert_trigger)
        self.tag_panel.undo_requested.connect(self.undo)
        self.tabs.addTab(self.tag_panel, "Tags")
        self.buckets = QTreeWidget()
        self.buckets.setHeaderLabels(["Bucket (width × height)", "Images"])
        self.buckets.setRootIsDecorated(False)
        self.buckets.header().setSectionResizeMode(0, QHeaderView.Stretch)
        self.buckets.header().setStretchLastSection(False)
        self.tabs.addTab(self.buckets, "Buckets")

        self._rescan_timer = QTimer(self)
        self._rescan_timer.setSingleShot(True)
        self._rescan_timer.setInterval(400)
        self._rescan_timer.timeout.connect(self.rescan)
        model.changed.connect(self._on_changed)  # a new job announces every field, its folder included
        self._show_path()

    # -------------------------------------------------------------------------------------------- state

    def state(self) -> tuple[str, str]:
        path = self.model.value("dataset.path")
        if not path:
            return PENDING, "Choose the folder with your training images."
        errors = [p for p in self.model.errors() if page_for_field(p.field) == "dataset"]
        if errors:
            return ATTENTION, errors[0].message
        if self.scan_error:
            return ATTENTION, self.scan_error
        if self.scan is not None and self.scan.report.usable == 0:
            return ATTENTION, "The folder has no usable images."
        if self.scan is None:
            return PENDING, "Checking the images…"
        return DONE, self.scan.report.summary()

    def refresh_icons(self) -> None:
        super().refresh_icons()
        self.drop.refresh_icon()
        self.bar.refresh_icon()

    # ------------------------------------------------------------------------------------------- actions

    def choose(self, path: str) -> None:
        self.model.set_value("dataset.path", path)

    def use_demo_images(self) -> None:
        """The bundled shapes with the demo's trigger word (and the demo's recipe when the demo model is chosen)."""
        from studio.engine.config import BUILTIN_DEMO_MODEL
        from studio.engine.demo import demo_dataset_settings, demo_model_settings

        settings = demo_dataset_settings()
        if self.model.value("model.path") == BUILTIN_DEMO_MODEL:
            settings.update(demo_model_settings())
        self.model.apply(settings)

    def browse(self) -> None:
        start = self.model.value("dataset.path") or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose the folder with your images", start)
        if path:
            self.drop.offer(path)

    def rescan(self) -> None:
        section = self.model.snapshot().dataset
        if not section.path or not Path(section.path).expanduser().is_dir():
            return
        self.scan_error = ""
        self.busy.start("Checking images…")
        self.progress.setRange(0, 0)
        self.progress.show()
        self.rescan_button.setEnabled(False)
        self.tasks.run("scan", backend.scan_dataset, section, progress=True, stoppable=True,
                       what="Checking the dataset", on_done=self._on_scanned, on_error=self._on_scan_failed,
                       on_progress=self._on_scan_progress, on_finished=self._scan_finished)
        self.state_changed.emit()

    @property
    def scanning(self) -> bool:
        return self.tasks.is_running("scan")

    # ----------------------------------------------------------------------------------------- scanning

    def _on_scan_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.busy.set_text(f"Checking images… {done} / {total}")

    def _scan_finished(self) -> None:
        if not self.scanning:
            self.busy.stop()
            self.progress.hide()
            self.rescan_button.setEnabled(True)

    def _on_scan_failed(self, message: str, details: str) -> None:
        self.scan = None
        self.scan_error = message
        self.banner.show_message("error", message, details)
        self.state_changed.emit()

    def _on_scanned(self, scan: backend.DatasetScan) -> None:
        self.scan = scan
        self.scan_error = ""
        report = scan.report
        errors = len(report.by_severity("error"))
        warnings = len(report.by_severity("warning"))
        summary = report.summary()
        self.summary.setText(summary[0].upper() + summary[1:] + ".")
        if report.usable == 0:
            self.banner.show_message("error", "No usable images in this folder. The Problems tab says why each "
                                              "file was skipped.")
        elif errors or warnings:
            self.banner.show_message("warning", f"{plural(errors + warnings, 'file needs', 'files need')} a look: "
                                                "see the Problems tab.")
        else:
            self.banner.hide()
        self._fill_grid(report)
        self._fill_problems(report)
        self._fill_tags(report)
        self._fill_buckets(scan.buckets)
        self._fill_repeats(report)
        self.state_changed.emit()

    def _fill_grid(self, report: Any) -> None:
        wanted = [item.image_path for item in report.items]
        self.grid.blockSignals(True)
        try:
            self.grid.clear()
            self._items.clear()
            for data in report.items:
                text = data.caption or ""
                item = QListWidgetItem(text if text else "")
                item.setData(PATH_ROLE, str(data.image_path))
                item.setData(CAPTION_ROLE, text)
                # Only the start of an over-long caption file is read: saving an edit would cut the file to it.
                editable = not getattr(data, "caption_truncated", False)
                if editable:
                    item.setFlags(item.flags() | Qt.ItemIsEditable)
                source = {"missing": "no caption file yet", "empty": "caption file is empty"}.get(data.caption_source, "")
                hint = ("Double-click to edit the caption." if editable else
                        "The caption file is far too long; only its start is used. Edit it in a text editor.")
                item.setToolTip(f"{data.image_path.name} · {data.width} × {data.height} px · {data.repeats}× per epoch"
                                + (f"\n{source}" if source else "") + "\n" + hint)
                if data.image_path in self._thumbs:
                    item.setIcon(self._thumbs[data.image_path])
                else:
                    item.setIcon(theme.icon("image"))
                self.grid.addItem(item)
                self._items[data.image_path] = item
        finally:
            self.grid.blockSignals(False)
        self.tabs.setTabText(0, f"Images ({len(wanted)})")
        missing = [p for p in wanted if p not in self._thumbs]
        if missing:
            self.tasks.run("thumbs", backend.make_thumbnails, missing, self._thumb_pixels(), progress=True,
                           stoppable=True, what="Making thumbnails", on_progress=self._on_thumbs)

    def _on_thumbs(self, batch: list[tuple[Path, Any]]) -> None:
        self.grid.blockSignals(True)
        try:
            for path, image in batch:
                if image is None:
                    continue
                pixmap = pil_to_pixmap(image)
                self._thumbs[path] = pixmap
                item = self._items.get(path)
                if item is not None:
                    item.setIcon(pixmap)
        finally:
            self.grid.blockSignals(False)

    def _fill_problems(self, report: Any) -> None:
        self.problems.clear()
        for issue in report.issues:
            row = QTreeWidgetItem([issue.file, issue.problem, issue.action])
            row.setIcon(0, theme.icon(SEVERITY_ICONS.get(issue.severity, "info")))
            for c in range(3):
                row.setToolTip(c, f"{issue.file}\n{issue.problem}\n→ {issue.action}")
            self.problems.addTopLevelItem(row)
        if not report.issues:
            row = QTreeWidgetItem(["", "No problems found.", ""])
            row.setIcon(1, theme.icon("state-done"))
            self.problems.addTopLevelItem(row)
        self.problems.resizeColumnToContents(0)
        self.problems.setColumnWidth(1, max(self.problems.columnWidth(1), theme.em(self) * 22))
        n = len([i for i in report.issues if i.severity in ("error", "warning")])
        self.tabs.setTabText(1, f"Problems ({n})" if n else "Problems")
        # The icon says the worst there is: a tick only when there is nothing at all to read.
        worst = next((sev for sev in ("error", "warning", "info") if report.by_severity(sev)), None)
        self.tabs.setTabIcon(1, theme.icon(SEVERITY_ICONS.get(worst, "info")) if worst else theme.icon("state-done"))
        self.problems_icon = worst or "done"

    def _fill_tags(self, report: Any) -> None:
        from studio.engine.captioning.bulk_edit import tag_frequency

        totals: dict[str, int] = {}
        for counts in report.tag_frequency().values():  # as trained (trigger applied), over every folder
            for tag, n in counts.items():
                totals[tag] = totals.get(tag, 0) + n
        in_files = {tag for tag, _ in tag_frequency({i: item.caption for i, item in enumerate(report.items)})}
        self.tag_panel.fill(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])), set(totals) - in_files)
        self.tag_panel.set_undo(self.journal.next_label)

    def _fill_buckets(self, buckets: dict[tuple[int, int], int]) -> None:
        self.buckets.clear()
        for (w, h), n in buckets.items():
            row = QTreeWidgetItem([f"{w} × {h} px", str(n)])
            row.setTextAlignment(1, Qt.AlignRight | Qt.AlignVCenter)
            self.buckets.addTopLevelItem(row)
        self.tabs.setTabText(3, f"Buckets ({len(buckets)})")

    def _fill_repeats(self, report: Any) -> None:
        folders = sorted({item.folder for item in report.items})
        counts: dict[str, int] = {}
        effective: dict[str, int] = {}
        for item in report.items:
            counts[item.folder] = counts.get(item.folder, 0) + 1
            effective[item.folder] = item.repeats
        if list(self.repeat_spins) != folders:
            while self.repeats_layout.count():
                w = self.repeats_layout.takeAt(0).widget()
                if w is not None:
                    w.deleteLater()
            self.repeat_spins.clear()
            for folder in folders:
                spin = QSpinBox()
                spin.setRange(1, 1000)
                spin.setSuffix("×")
                spin.setKeyboardTracking(False)
                name = folder or "Top folder"
                spin.setPrefix(f"{name}: ")
                spin.setToolTip(f"How often each of the {counts[folder]} image(s) in “{name}” is seen per epoch.")
                spin.valueChanged.connect(lambda v, f=folder: self._set_repeats(f, v))
                self.repeats_layout.addWidget(spin)
                self.repeat_spins[folder] = spin
            self.repeats_layout.addStretch(1)
        for folder, spin in self.repeat_spins.items():
            spin.blockSignals(True)
            spin.setValue(effective.get(folder, 1))
            spin.blockSignals(False)

    def _set_repeats(self, folder: str, value: int) -> None:
        # The top folder uses default_repeats; sub-folders get an entry in the repeats table.
        if folder == "":
            self.model.set_value("dataset.default_repeats", value)
            return
        repeats = dict(self.model.value("dataset.repeats"))
        repeats[folder] = value
        self.model.set_value("dataset.repeats", repeats)

    # ------------------------------------------------------------------------------------------ captions

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        text = item.text().strip()
        if text == item.data(CAPTION_ROLE):
            return
        path = Path(item.data(PATH_ROLE))
        try:
            backend.save_caption(path, text, self.model.value("dataset.caption_extension"))
        except Exception as exc:  # e.g. a read-only folder: say so and put the old caption back
            self.banner.show_message("error", f"The caption of {path.name} could not be saved: {exc}")
            self.grid.blockSignals(True)
            item.setText(item.data(CAPTION_ROLE))
            self.grid.blockSignals(False)
            return
        self.grid.blockSignals(True)
        item.setData(CAPTION_ROLE, text)
        self.grid.blockSignals(False)

    # -------------------------------------------------------------------------------------- captioning

    def open_caption_dialog(self) -> CaptionDialog | None:
        path = self.model.value("dataset.path")
        if not path or not Path(path).expanduser().is_dir():
            return None
        if self.caption_dialog is not None:
            self.caption_dialog.close()
            self.caption_dialog.deleteLater()
        dialog = CaptionDialog(Path(path).expanduser(), self.model.value("dataset.caption_extension"),
                               self.model.value("dataset.trigger_word"), self.tasks, self._thumbs, parent=self)
        dialog.captions_written.connect(self._on_captions_written)
        dialog.setWindowModality(Qt.WindowModal)
        dialog.show()
        self.caption_dialog = dialog
        return dialog

    def _on_captions_written(self, result: Any) -> None:
        self.journal.push(result.edit)
        self.tag_panel.set_undo(self.journal.next_label)
        self.rescan()  # the doctor re-reads every caption

    # ------------------------------------------------------------------------------------------ bulk edit

    def _file_captions(self) -> dict[Path, str]:
        """{caption file: its text} for every usable image (files that do not exist yet included, as "")."""
        from studio.engine.dataset import caption_path_for

        if self.scan is None:
            return {}
        ext = self.model.value("dataset.caption_extension")
        return {caption_path_for(item.image_path, ext): item.caption for item in self.scan.report.items}

    def bulk_edit(self, label: str, change: Any) -> bool:
        """Apply ``change`` ({caption file: text} → the changed ones) to every caption; False if nothing changes."""
        if self.scan is None or self.tasks.is_running("bulk-edit") or self.scanning:
            return False
        changes = change(self._file_captions())
        if not changes:
            self.banner.show_message("info", f"{label}: no caption needed changing.")
            return False
        self.tag_panel.set_busy(True)
        self.busy.start(f"{label}…")
        self.tasks.run("bulk-edit", caption_backend.write_edit, changes, label, what=label,
                       on_done=self._on_edited, on_error=self._on_edit_failed, on_finished=self._edit_finished)
        return True

    def add_tag(self, tag: str, front: bool = False) -> bool:
        from studio.engine.captioning.bulk_edit import add_tag

        return self.bulk_edit(f"Add “{tag}”", lambda c: add_tag(c, tag, front=front))

    def remove_tag(self, tag: str) -> bool:
        from studio.engine.captioning.bulk_edit import remove_tag

        return self.bulk_edit(f"Remove “{tag}”", lambda c: remove_tag(c, tag))

    def replace_tag(self, old: str, new: str) -> bool:
        from studio.engine.captioning.bulk_edit import replace_tag

        return self.bulk_edit(f"Replace “{old}” with “{new}”", lambda c: replace_tag(c, old, new))

    def move_tag_to_front(self, tag: str) -> bool:
        from studio.engine.captioning.bulk_edit import move_to_front

        return self.bulk_edit(f"Move “{tag}” to the front", lambda c: move_to_front(c, tag))

    def insert_trigger(self) -> bool:
        from studio.engine.captioning.bulk_edit import insert_trigger

        trigger = self.model.value("dataset.trigger_word").strip()
        if not trigger:
            self.banner.show_message("info", "Set a trigger word first; it is then written first into every caption.")
            return False
        return self.bulk_edit(f"Insert trigger word “{trigger}”", lambda c: insert_trigger(c, trigger))

    def undo(self) -> bool:
        if not self.journal.can_undo or self.tasks.is_running("bulk-edit"):
            return False
        label = self.journal.next_label
        self.tag_panel.set_busy(True)
        self.busy.start(f"Undoing {label}…")
        self.tasks.run("bulk-edit", caption_backend.undo, self.journal, what="Undo",
                       on_done=self._on_undone, on_error=self._on_edit_failed, on_finished=self._edit_finished)
        return True

    def _on_edited(self, edit: Any) -> None:
        self.journal.push(edit)
        n = len(edit.changes)
        if edit.failed:
            names = "; ".join(f"{p.name}: {why}" for p, why in edit.failed[:5])
            self.banner.show_message("error", f"{edit.label}: {plural(len(edit.failed), 'caption')} could not be "
                                              f"changed ({names}); {plural(n, 'other was', 'others were')} changed.")
        else:
            self.banner.show_message("success", f"{edit.label}: {plural(n, 'caption')} changed. Undo puts them back.")

    def _on_undone(self, outcome: Any) -> None:
        if outcome is None:
            return
        edit, result = outcome
        text = f"Undid {edit.label}: {plural(len(result.restored), 'caption')} put back."
        if result.kept:
            names = "; ".join(f"{p.name}: {why}" for p, why in result.kept[:5])
            self.banner.show_message("warning", f"{text} Not restored: {names}.")
        else:
            self.banner.show_message("success", text)

    def _on_edit_failed(self, message: str, details: str) -> None:
        self.banner.show_message("error", message, details)

    def _edit_finished(self) -> None:
        self.tag_panel.set_busy(False)
        self.tag_panel.set_undo(self.journal.next_label)
        if not self.scanning:
            self.busy.stop()
        self.rescan()  # the doctor re-runs after each change

    # ------------------------------------------------------------------------------------------ model

    def _on_changed(self, path: str, value: Any) -> None:
        if path == "dataset.path":
            self._show_path()
        elif path in RESCAN_FIELDS:
            self._rescan_timer.start()
        elif path in BUCKET_FIELDS and self.scan is not None:
            try:
                self.scan.buckets = backend.plan_buckets(self.scan.report.items, self.model.job.dataset)
            except Exception:  # e.g. a resolution below the bucket step: the field itself says so
                self.scan.buckets = {}
            self._fill_buckets(self.scan.buckets)

    def _show_path(self) -> None:
        path = self.model.value("dataset.path")
        self.scan = None
        self.scan_error = ""
        self.journal.clear()  # undo belongs to the folder it was made in
        self.tasks.cancel("scan")
        self.tasks.cancel("thumbs")
        self.banner.hide()
        if not path:
            self.stack.setCurrentIndex(0)
            self.state_changed.emit()
            return
        self.stack.setCurrentIndex(1)
        self.bar.title.setText(Path(path).name or path)
        self.bar.subtitle.setText(f"{path} — drop another folder here to switch.")
        self.summary.setText("Checking the images…")
        for w in (self.grid, self.problems, self.tags, self.buckets):
            w.clear()
        if Path(path).expanduser().is_dir():
            self._rescan_timer.stop()
            self.rescan()
        else:
            self.summary.setText("This folder cannot be found.")
            self.banner.show_message("error", f"“{path}” is not a folder. Choose the folder that holds your images.")
        self.state_changed.emit()

    def _thumb_pixels(self) -> int:
        return theme.em(self) * 6

    def _size_grid(self) -> None:
        side = self._thumb_pixels()
        self.grid.setIconSize(QSize(side, side))
        self.grid.setGridSize(QSize(side + 3 * theme.SPACING, side + 4 * theme.em(self)))
