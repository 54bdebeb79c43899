"""Try & Export page: compare base and LoRA at the same seed, pick a saved step, export it for A1111/ComfyUI."""

from __future__ import annotations

import html
import random
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices, QPixmap
from PySide6.QtWidgets import (
    QButtonGroup, QComboBox, QFileDialog, QFormLayout, QFrame, QGridLayout, QHBoxLayout, QLabel, QLineEdit,
    QPlainTextEdit, QPushButton, QRadioButton, QScrollArea, QSizePolicy, QSlider, QSpinBox, QStackedWidget, QTabWidget,
    QVBoxLayout, QWidget,
)

from studio.ui import backend, theme
from studio.ui.format import format_bytes
from studio.ui.images import pil_to_pixmap
from studio.ui.job_model import JobModel
from studio.ui.pages.base import DONE, PENDING, Page, card, section_label
from studio.ui.widgets.banner import Banner
from studio.ui.widgets.compare_grid import CompareGridWidget
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.drop_zone import DropZone
from studio.ui.widgets.export_report import ExportReportWidget
from studio.ui.widgets.lora_tools import LoraToolsWidget
from studio.ui.widgets.gallery import ImageDialog

FORMATS = {
    "a1111": ("A1111 / ComfyUI file (.safetensors)",
              "The usual LoRA file: works in AUTOMATIC1111, Forge, ComfyUI, InvokeAI and diffusers (SDXL "
              "text-encoder LoRAs need transformers 5.10.2 or newer there)."),
    "diffusers": ("Diffusers folder",
                  "PEFT layout for diffusers' load_lora_weights(folder); A1111 cannot read it."),
    "merged": ("Merged checkpoint (.safetensors)",
               "A full base model with the LoRA baked in at the Strength set under Try it, for tools without LoRA support."),
}


def lora_check(path: Path) -> str | None:
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return None
    if path.is_dir():
        return f"“{path.name}” is a folder. Drop a LoRA file (.safetensors), e.g. from a run folder."
    return f"“{path.name}” is not a .safetensors file. Drop a LoRA file."


class ImagePanel(QWidget):
    """A titled image slot that scales its picture and enlarges on click."""

    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(parent)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(theme.SPACING // 2)
        self.title = section_label(title)
        self.image = QLabel("Press Generate to see it.")
        self.image.setObjectName("imageSlot")
        self.image.setAlignment(Qt.AlignCenter)
        self.image.setWordWrap(True)
        side = theme.em(self) * 10
        self.image.setMinimumSize(side, side)
        self.image.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.image.mousePressEvent = lambda e: self.enlarge()
        self.pixmap: QPixmap | None = None
        self.stale = False  # the picture no longer matches the controls (a new one is on its way)
        col.addWidget(self.title)
        col.addWidget(self.image, 1)

    def set_pixmap(self, pixmap: QPixmap | None) -> None:
        self.pixmap = pixmap
        self.set_stale(False)
        self._rescale()

    def set_stale(self, stale: bool) -> None:
        """Dim the picture while it shows settings that are no longer the current ones."""
        from PySide6.QtWidgets import QGraphicsOpacityEffect

        self.stale = stale
        if stale:
            effect = QGraphicsOpacityEffect(self.image)
            effect.setOpacity(0.35)
            self.image.setGraphicsEffect(effect)
        else:
            self.image.setGraphicsEffect(None)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._rescale()

    def _rescale(self) -> None:
        if self.pixmap is None or self.pixmap.isNull():
            return
        size = self.image.size() * 0.98
        mode = Qt.FastTransformation if self.pixmap.width() < 256 else Qt.SmoothTransformation  # keep small ones crisp
        self.image.setPixmap(self.pixmap.scaled(size, Qt.KeepAspectRatio, mode))

    def enlarge(self) -> None:
        if self.pixmap is not None:
            dialog = ImageDialog(self.pixmap, self.title.text(), self)
            dialog.setAttribute(Qt.WA_DeleteOnClose)
            dialog.open()


class TryExportPage(Page):
    title = "Try & Export"
    icon_name = "export"
    purpose = "See what the LoRA does to the same picture, then save it where A1111 or ComfyUI will find it."
    help_html = (
        "<p>Choose a LoRA from the last run (the final one, or one saved at an earlier step) or open any LoRA file. "
        "<b>Generate</b> makes one image with the base model and one with the LoRA, with the same prompt and seed, "
        "so the difference is the LoRA alone. <b>Strength</b> is how strongly it is applied (1.0 = as trained).</p>"
        "<p><b>Compare steps</b> draws every LoRA the run saved (one row per step) at several strengths, with one "
        "prompt and seed: where the pictures stop getting better is the step to export.</p>"
        "<p><b>Export</b> writes the chosen file with your title, trigger words and description in its metadata "
        "(A1111's Lora tab and Civitai show them). Put it into <i>models/Lora</i> (A1111) or <i>models/loras</i> "
        "(ComfyUI).</p>")

    def __init__(self, model: JobModel, tasks, parent: QWidget | None = None):
        super().__init__(parent)
        self.best_step: int | None = None  # the run's step with the lowest validation loss, when it was measured
        self.final_step: int | None = None
        self.model = model
        self.tasks = tasks
        self.cache = backend.ModelCache()
        self.run_dir: Path | None = None
        self.info: dict[str, Any] | None = None
        self.exported: Path | None = None
        self.base_image: Any = None
        self.lora_image: Any = None
        s = theme.SPACING

        self.stack = QStackedWidget()
        self.layout_.addWidget(self.stack, 1)
        self.drop = DropZone(
            "Nothing to try yet",
            "Train a LoRA on the Train page: it appears here when training finishes. Or drop a LoRA file "
            "(.safetensors) here to try and export it.", icon="export", check=lora_check)
        self.drop.add_button(QPushButton(theme.icon("file"), "Open LoRA file…")).clicked.connect(self.browse)
        self.drop.dropped.connect(self.add_file)
        self.stack.addWidget(self.drop)

        loaded = QWidget()
        col = QVBoxLayout(loaded)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(2 * s)
        self.stack.addWidget(loaded)

        # Which LoRA.
        pick_card, pick = card()
        row = QHBoxLayout()
        row.setSpacing(s)
        row.addWidget(QLabel("LoRA"))
        self.lora_combo = QComboBox()
        self.lora_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.lora_combo.setMinimumContentsLength(24)
        self.lora_combo.setToolTip("The final LoRA of the run, or one saved at an earlier step.")
        self.lora_combo.currentIndexChanged.connect(self._on_lora_selected)
        row.addWidget(self.lora_combo, 1)
        self.open_button = QPushButton(theme.icon("file"), "Open file…")
        self.open_button.clicked.connect(self.browse)
        row.addWidget(self.open_button)
        pick.addLayout(row)
        self.lora_info = QLabel()
        self.lora_info.setObjectName("muted")
        self.lora_info.setWordWrap(True)
        pick.addWidget(self.lora_info)
        col.addWidget(pick_card)

        halves = QHBoxLayout()
        halves.setSpacing(2 * s)
        col.addLayout(halves, 1)

        # Try it.
        try_card, tc = card()
        tc.addWidget(section_label("Try it"))
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("A prompt with your trigger word, e.g. “sks_dog sitting in a meadow”")
        self.prompt.returnPressed.connect(self.generate)
        tc.addWidget(self.prompt)
        controls = QGridLayout()
        controls.setHorizontalSpacing(s)
        controls.setVerticalSpacing(s)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(1234)
        self.seed.setToolTip("The same seed gives the same starting noise for both images.")
        dice = QPushButton("New seed")
        dice.clicked.connect(lambda: self.seed.setValue(random.randrange(2**31 - 1)))
        self.steps = QSpinBox()
        self.steps.setRange(1, 150)
        self.steps.setValue(20)
        self.steps.setToolTip("Denoising steps per image.")
        self.strength = QSlider(Qt.Horizontal)
        self.strength.setRange(0, 150)
        self.strength.setValue(100)
        self.strength.setToolTip("How strongly the LoRA is applied: 1.0 is as trained.")
        self.strength_label = QLabel()
        self.strength.valueChanged.connect(self._on_strength)
        controls.addWidget(QLabel("Seed"), 0, 0)
        controls.addWidget(self.seed, 0, 1)
        controls.addWidget(dice, 0, 2)
        controls.addWidget(QLabel("Steps"), 0, 3)
        controls.addWidget(self.steps, 0, 4)
        controls.addWidget(QLabel("Strength"), 1, 0)
        controls.addWidget(self.strength, 1, 1, 1, 3)
        controls.addWidget(self.strength_label, 1, 4)
        controls.setColumnStretch(1, 1)
        tc.addLayout(controls)
        gen_row = QHBoxLayout()
        self.generate_button = QPushButton(theme.icon("wand"), "Generate")
        self.generate_button.setObjectName("primary")
        self.generate_button.clicked.connect(self.generate)
        self.generate_busy = BusyIndicator()
        gen_row.addWidget(self.generate_button)
        gen_row.addWidget(self.generate_busy, 1)
        tc.addLayout(gen_row)
        self.try_banner = Banner()
        tc.addWidget(self.try_banner)
        images = QHBoxLayout()
        images.setSpacing(2 * s)
        self.base_panel = ImagePanel("Base model")
        self.lora_panel = ImagePanel("With LoRA")
        images.addWidget(self.base_panel)
        images.addWidget(self.lora_panel)
        tc.addLayout(images, 1)
        # Compare steps: the run's saved LoRAs × strengths (its own widget; the cells are cached in the run folder).
        self.grid = CompareGridWidget(tasks, self.cache, lambda: self.model.snapshot().model)
        self.grid.step_chosen.connect(self.select_lora)
        grid_card, gc = card()
        gc.addWidget(self.grid)
        self.try_tabs = QTabWidget()
        self.try_tabs.addTab(try_card, "Try it")
        self.try_tabs.addTab(grid_card, "Compare steps")
        halves.addWidget(self.try_tabs, 3)

        # Export.
        export_card, ec = card()
        ec.addWidget(section_label("Export"))
        self.format_group = QButtonGroup(self)
        self.format_buttons: dict[str, QRadioButton] = {}
        for key, (label, tip) in FORMATS.items():
            button = QRadioButton(label)
            button.setToolTip(tip)
            self.format_group.addButton(button)
            self.format_buttons[key] = button
            ec.addWidget(button)
            note = QLabel(tip)
            note.setObjectName("muted")
            note.setWordWrap(True)
            note.setContentsMargins(theme.em(self) + s, 0, 0, 0)
            ec.addWidget(note)
        self.format_buttons["a1111"].setChecked(True)
        self.format_group.buttonToggled.connect(self._on_format)
        form = QFormLayout()
        form.setHorizontalSpacing(2 * s)
        form.setVerticalSpacing(s)
        self.title_edit = QLineEdit()
        self.title_edit.setToolTip("Shown as the LoRA's name in A1111's Lora tab and on Civitai.")
        self.trigger_edit = QLineEdit()
        self.trigger_edit.setToolTip("Words to put in a prompt to call up what the LoRA learned; separate several with commas.")
        self.description_edit = QPlainTextEdit()
        self.description_edit.setTabChangesFocus(True)
        self.description_edit.setFixedHeight(theme.em(self) * 4)
        self.description_edit.setToolTip("A few words on what it does and how to use it.")
        form.addRow("Title", self.title_edit)
        form.addRow("Trigger words", self.trigger_edit)
        form.addRow("Description", self.description_edit)
        ec.addLayout(form)
        export_row = QHBoxLayout()
        self.export_button = QPushButton(theme.icon("export"), "Export…")
        self.export_button.setObjectName("primary")
        self.export_button.clicked.connect(self.export)
        self.export_busy = BusyIndicator()
        export_row.addWidget(self.export_button)
        export_row.addWidget(self.export_busy, 1)
        ec.addLayout(export_row)
        self.export_banner = Banner()
        self.show_exported = self.export_banner.add_action(QPushButton(theme.icon("folder"), "Show in folder"))
        self.show_exported.clicked.connect(self._show_exported)
        ec.addWidget(self.export_banner)
        self.report = ExportReportWidget()  # per consumer: does the selected/exported file load fully
        ec.addWidget(self.report)
        self.tools = LoraToolsWidget(self.tasks, self.selected_lora)  # resize / merge
        ec.addWidget(self.tools)
        ec.addStretch(1)
        # The export column scrolls rather than setting the window's minimum size: with the report and the tools it
        # is taller than a laptop's 1366x768 screen leaves for it.
        export_scroll = QScrollArea()
        export_scroll.setWidget(export_card)
        export_scroll.setWidgetResizable(True)
        export_scroll.setFrameShape(QFrame.NoFrame)
        export_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        halves.addWidget(export_scroll, 2)

        # A new strength regenerates the LoRA picture once the slider rests (the old one is dimmed meanwhile).
        self._shown_strength: float | None = None
        self._pair_key: tuple | None = None  # (LoRA, prompt, seed, steps) of the base picture shown
        self.regenerate_timer = QTimer(self)
        self.regenerate_timer.setSingleShot(True)
        self.regenerate_timer.setInterval(350)
        self.regenerate_timer.timeout.connect(self._regenerate_lora)
        self._on_strength(self.strength.value())
        model.changed.connect(self._on_model_changed)

    # -------------------------------------------------------------------------------------------- state

    def state(self) -> tuple[str, str]:
        if self.exported is not None:
            return DONE, f"Exported {self.exported.name}."
        if self.lora_combo.count():
            return PENDING, "Try the LoRA, then export it."
        return PENDING, "Train a LoRA first, or open one."

    def refresh_icons(self) -> None:
        super().refresh_icons()
        self.drop.refresh_icon()

    # ------------------------------------------------------------------------------------------ choosing

    def set_run(self, run_dir: Path | None, lora_path: Path | None = None, *, best_step: int | None = None,
                final_step: int | None = None) -> None:
        """Show the LoRAs of a run folder, selecting ``lora_path`` (the final one after a finished run); the file of
        ``best_step`` (the lowest validation loss) is marked."""
        self.run_dir = Path(run_dir) if run_dir else None
        self.best_step, self.final_step = best_step, final_step
        files = backend.run_loras(self.run_dir) if self.run_dir else []
        if lora_path and Path(lora_path) not in files and Path(lora_path).is_file():
            files.insert(0, Path(lora_path))
        self._fill(files, Path(lora_path) if lora_path else (files[0] if files else None))
        self.grid.set_run(self.run_dir, self._prompt_choices())

    def _prompt_choices(self) -> list[str]:
        """The run's preview prompts (with its trigger word), then the current prompt."""
        job = self.model.job
        if self.run_dir is not None and (self.run_dir / "job.toml").is_file():
            from studio.engine.grid import run_job

            try:
                job = run_job(self.run_dir)
            except Exception:  # an unreadable job.toml: the window's job still gives useful prompts
                pass
        prompts = [p.replace("{trigger}", job.dataset.trigger_word).strip() for p in job.sampling.prompts]
        return [p for p in prompts if p] + ([self.prompt.text()] if self.prompt.text() else [])

    def select_lora(self, path: Path) -> None:
        """Choose one of the listed LoRAs (e.g. a step picked in the grid) for trying and export."""
        index = self.lora_combo.findData(str(path))
        if index >= 0:
            self.lora_combo.setCurrentIndex(index)

    def add_file(self, path: str) -> None:
        p = Path(path)
        files = [Path(self.lora_combo.itemData(i)) for i in range(self.lora_combo.count())]
        if p not in files:
            files.insert(0, p)
        self._fill(files, p)

    def _fill(self, files: list[Path], select: Path | None) -> None:
        self.lora_combo.blockSignals(True)
        self.lora_combo.clear()
        for f in files:
            step = f.stem.rsplit("-step", 1)
            at = int(step[1]) if len(step) == 2 and step[1].isdigit() else None
            label = f"{f.name} — step {at}" if at is not None else f"{f.name} — final"
            if self.best_step is not None and (at if at is not None else self.final_step) == self.best_step:
                label += " ★ lowest validation loss"
            if self.run_dir is None or f.parent != self.run_dir:
                label = f"{f.name} — {f.parent}"
            self.lora_combo.addItem(theme.icon("export"), label, str(f))
        index = files.index(select) if select in files else 0
        self.lora_combo.setCurrentIndex(index)
        self.lora_combo.blockSignals(False)
        self.stack.setCurrentIndex(1 if files else 0)
        self.exported = None
        self.export_banner.hide()
        self._on_lora_selected()
        self.state_changed.emit()

    def selected_lora(self) -> Path | None:
        data = self.lora_combo.currentData()
        return Path(data) if data else None

    def browse(self) -> None:
        start = str(self.run_dir or Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Open a LoRA", start, "LoRA files (*.safetensors)")
        if path:
            self.drop.offer(path)

    def _on_lora_selected(self) -> None:
        path = self.selected_lora()
        self.info = None
        self.lora_info.setText("")
        if path is None:
            return
        self.tasks.run("describe", backend.describe_lora, path, engine=True, what="Reading the LoRA",
                       on_done=self._show_info, on_error=lambda m, d: self.lora_info.setText(m))
        if not self.prompt.text():
            self.prompt.setText(self._default_prompt())

    def _show_info(self, info: dict) -> None:
        self.info = info
        parts = []
        if info.get("rank"):
            parts.append(f"rank {info['rank']}" + (f", alpha {info['alpha']:g}" if info.get("alpha") is not None else ""))
        if info.get("steps"):
            parts.append(f"{info['steps']} steps")
        family = info.get("family_short_label") or info.get("family") or ""
        if family:
            parts.append(f"for {family}")
        if info.get("size_bytes"):
            parts.append(format_bytes(info["size_bytes"]))
        self.lora_info.setText(" · ".join(parts))
        meta = info.get("metadata", {})
        self.title_edit.setText(info.get("title") or meta.get("modelspec.title") or "")
        self.trigger_edit.setText(info.get("trigger_phrase") or meta.get("modelspec.trigger_phrase") or "")
        self.description_edit.setPlainText(meta.get("modelspec.description", ""))
        self.report.set_report(info.get("consumers") or [], info.get("problem"))

    def _default_prompt(self) -> str:
        job = self.model.job
        prompts = [p.replace("{trigger}", job.dataset.trigger_word) for p in job.sampling.prompts if p.strip()]
        if prompts:
            return prompts[0]
        return job.dataset.trigger_word or ""

    # ------------------------------------------------------------------------------------------ trying

    def _on_strength(self, value: int) -> None:
        self.strength_label.setText(f"{value / 100:.2f}×")
        if self._shown_strength is None or self.lora_image is None:
            self.lora_panel.title.setText(f"With LoRA at {value / 100:.2f}×")
            return
        # The title says what the picture shows until the new one arrives.
        stale = abs(self._shown_strength - value / 100) > 1e-9
        self.lora_panel.set_stale(stale)
        self.lora_panel.title.setText(f"With LoRA at {self._shown_strength:.2f}×" +
                                      (f" — updating to {value / 100:.2f}×…" if stale else ""))
        if stale:
            self.regenerate_timer.start()  # restarts while the slider moves: one picture when it rests

    def _regenerate_lora(self) -> None:
        if self.tasks.is_running("generate"):
            self.regenerate_timer.start()  # after the picture being made now
            return
        self.generate(lora_only=True)

    def generate(self, lora_only: bool = False) -> None:
        lora = self.selected_lora()
        if lora is None or self.tasks.is_running("generate"):
            return
        prompt = self.prompt.text().strip()
        if not prompt:
            self.try_banner.show_message("warning", "Write a prompt first — with your trigger word, so the LoRA has "
                                                    "something to respond to.")
            return
        self.try_banner.hide()
        job = self.model.snapshot()
        size = job.sampling.width or job.dataset.resolution  # as trained, so the comparison is fair
        self.generate_button.setEnabled(False)
        strength = self.strength.value() / 100
        kwargs = dict(negative_prompt=job.sampling.negative_prompt, seed=self.seed.value(), steps=self.steps.value(),
                      guidance=job.sampling.guidance, strength=strength, size=size)
        key = (str(lora), prompt, self.seed.value(), self.steps.value())
        if lora_only and self.base_image is not None and key == self._pair_key:
            self.generate_busy.start(f"Generating with the LoRA at {strength:.2f}×…")
            fn, on_done = backend.generate_with_lora, lambda image: self._show_pair((self.base_image, image), strength)
        else:
            self.generate_busy.start("Loading the model and generating both images…")
            self._pair_key = key
            fn, on_done = backend.generate_pair, lambda pair: self._show_pair(pair, strength)
        self.tasks.run("generate", fn, self.cache, job.model, lora, prompt, **kwargs,
                       engine=True, what="Generating", on_done=on_done,
                       on_error=lambda m, d: self.try_banner.show_message("error", m, d),
                       on_finished=self._generate_finished)

    def _generate_finished(self) -> None:
        self.generate_button.setEnabled(True)
        self.generate_busy.stop()

    def _show_pair(self, pair: tuple[Any, Any], strength: float | None = None) -> None:
        self.base_image, self.lora_image = pair
        self._shown_strength = strength if strength is not None else self.strength.value() / 100
        self.base_panel.set_pixmap(pil_to_pixmap(self.base_image))
        self.lora_panel.set_pixmap(pil_to_pixmap(self.lora_image))
        self._on_strength(self.strength.value())  # the title, and another picture if the slider moved meanwhile

    # ------------------------------------------------------------------------------------------ export

    def selected_format(self) -> str:
        return next(k for k, b in self.format_buttons.items() if b.isChecked())

    def _on_format(self, *_: Any) -> None:
        # A merged checkpoint is a base model: LoRA title and trigger words do not apply to it.
        labelled = self.selected_format() != "merged"
        for w in (self.title_edit, self.trigger_edit, self.description_edit):
            w.setEnabled(labelled)

    def export(self) -> None:
        """Ask where, then export (the dialog is the only part tests replace)."""
        lora = self.selected_lora()
        if lora is None:
            return
        fmt = self.selected_format()
        name = self.title_edit.text().strip() or lora.stem
        suggested = str(Path.home() / (lora.stem if fmt != "merged" else f"{lora.stem}-merged"))
        if fmt == "diffusers":
            target = QFileDialog.getExistingDirectory(self, "Choose an empty folder for the diffusers LoRA", str(Path.home()))
        else:
            target, _ = QFileDialog.getSaveFileName(self, f"Export “{name}”", suggested + ".safetensors",
                                                    "Safetensors (*.safetensors)")
        if target:
            self.export_to(target)

    def export_to(self, target: str | Path) -> None:
        lora = self.selected_lora()
        if lora is None or self.tasks.is_running("export"):
            return
        fmt = self.selected_format()
        target = Path(target)
        if fmt != "diffusers" and target.suffix.lower() != ".safetensors":
            target = target.with_name(target.name + ".safetensors")
        job = self.model.snapshot()
        labels = dict(title=self.title_edit.text().strip(),
                      trigger_words=[w.strip() for w in self.trigger_edit.text().split(",") if w.strip()],
                      description=self.description_edit.toPlainText().strip())
        if fmt == "a1111":
            fn, args, kwargs = backend.export_lora_file, (lora, target), labels
        elif fmt == "diffusers":
            fn, args, kwargs = backend.export_diffusers, (self.cache, job.model, lora, target), labels
        else:
            fn, args = backend.export_merged, (job.model, lora, target, self.strength.value() / 100)
            kwargs = dict(progress=True, on_progress=lambda text: self.export_busy.set_text(f"{text}…"))
        self.export_button.setEnabled(False)
        self.export_banner.hide()
        self.export_busy.start(f"Exporting to {target.name}…")
        self.tasks.run("export", fn, *args, engine=True, what="Exporting", on_done=self._on_exported,
                       on_error=lambda m, d: self.export_banner.show_message("error", m, d),
                       on_finished=self._export_finished, **kwargs)

    def _export_finished(self) -> None:
        self.export_button.setEnabled(True)
        self.export_busy.stop()

    def _on_exported(self, path: Path) -> None:
        self.exported = Path(path)
        where = self.exported if self.exported.is_dir() else self.exported.parent
        self.export_banner.show_message(
            "success", f"Saved <b>{html.escape(self.exported.name)}</b> in {html.escape(str(where))}. Copy it to "
                       "A1111's models/Lora or ComfyUI's models/loras folder to use it.")
        self.state_changed.emit()
        if self.exported.is_file() and self.selected_format() != "merged":
            # The report of the file just written (its layout may differ from the run's file).
            self.tasks.run("report", backend.describe_lora, self.exported, engine=True, what="Checking the export",
                           on_done=lambda info: self.report.set_report(info.get("consumers") or [], info.get("problem")))

    def _show_exported(self) -> None:
        if self.exported is not None:
            folder = self.exported if self.exported.is_dir() else self.exported.parent
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _on_model_changed(self, path: str, value: Any) -> None:
        if path.startswith("model."):
            self.cache.clear()  # a different base model: load it again on the next Generate
