"""Model page: choose the base model (drop, browse, recent, found on this computer) and see what it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFileDialog, QFormLayout, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout, QWidget,
)

from studio.engine.config import BUILTIN_DEMO_MODEL
from studio.engine.families import supported_text
from studio.engine.demo import DEMO_LR, DEMO_RESOLUTION, DEMO_STEPS
from studio.ui import backend, settings_store, theme
from studio.ui.format import format_bytes
from studio.ui.job_model import JobModel
from studio.ui.pages.base import ATTENTION, DONE, PENDING, Page, card, page_for_field, section_label
from studio.ui.widgets.banner import Banner
from studio.ui.widgets.busy import BusyIndicator
from studio.ui.widgets.drop_zone import DropZone
from studio.ui.widgets.parts_panel import PartsPanel
from studio.ui.worker import TaskRunner

RECENT_KEY = "models/recent"
PREDICTION_NAMES = {"epsilon": "noise (epsilon)", "v_prediction": "v-prediction", "v": "v-prediction"}
DTYPE_NAMES = {"float16": "fp16 (half)", "fp16": "fp16 (half)", "bfloat16": "bf16", "bf16": "bf16",
               "float32": "fp32 (full)", "fp32": "fp32 (full)"}
DEMO_NOTE = ("A small model (Stable Diffusion 1.x layout, 64 px) that comes with LoRA Studio for trying the app: it "
             "draws simple coloured shapes (“a red circle”), and a LoRA teaches it the demo images' striped style "
             f"in about a minute, even without a GPU. Choosing it sets the demo's recipe ({DEMO_RESOLUTION} px, "
             f"learning rate {DEMO_LR:g}, {DEMO_STEPS} steps). Choose a real checkpoint to make a LoRA you can use.")


def model_check(path: Path) -> str | None:
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return None
        return (f"“{path.name}” is a folder but not a diffusers model (it has no model_index.json). Drop a "
                ".safetensors/.ckpt checkpoint or a diffusers model folder.")
    if path.is_file():
        if path.suffix.lower() in backend.MODEL_SUFFIXES:
            return None
        return (f"“{path.name}” is not a model file. Drop a checkpoint (.safetensors or .ckpt) or a diffusers "
                "model folder.")
    return f"“{path}” cannot be found."


def display_name(path: str) -> str:
    if path == BUILTIN_DEMO_MODEL:
        return "Built-in demo model"
    hub = backend.hub_name(Path(path))
    return hub or Path(path).name or path


class ModelPage(Page):
    title = "Base model"
    icon_name = "model"
    # The families come from the registry, so a new family is named here without touching the page.
    purpose = (f"The model your LoRA is trained for ({supported_text()}). The LoRA will work with this model and ones "
               "made from it.")
    help_html = (
        "<p>Choose the checkpoint you generate images with: a single <b>.safetensors</b>/<b>.ckpt</b> file "
        "(as used by AUTOMATIC1111 and ComfyUI) or a <b>diffusers</b> folder. Drop it on the page, browse for it, or "
        "pick one found in the usual A1111/ComfyUI folders and the Hugging Face cache.</p>"
        "<p>LoRA Studio reads the file to tell its family, what it predicts and its precision; nothing is downloaded. "
        "A file that holds only the transformer (as ComfyUI keeps the newer families) needs its "
        "text encoder and VAE files: the page lists them, finds them in the usual ComfyUI/A1111 folders, or lets you "
        "choose each one.</p><p>The <b>built-in demo model</b> is small and only draws simple shapes: good "
        "for learning the app (a LoRA visibly changes its pictures within a minute), useless for real pictures.</p>")

    def __init__(self, model: JobModel, tasks: TaskRunner, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.tasks = tasks
        self.info: dict[str, Any] | None = None
        self.inspect_error = ""
        self._looked = False  # the usual model folders are searched the first time the page is shown
        s = theme.SPACING

        self.drop = DropZone(
            "Drop a model here", "A checkpoint file (.safetensors, .ckpt) or a diffusers model folder. "
            "It is only read, never changed.", icon="model", check=model_check, compact=True)
        self.browse_file = self.drop.add_button(QPushButton(theme.icon("file"), "Choose file…"))
        self.browse_folder = self.drop.add_button(QPushButton(theme.icon("folder"), "Choose folder…"))
        self.use_demo = self.drop.add_button(QPushButton(theme.icon("sparkle"), "Use the demo model"))
        self.drop.dropped.connect(self.choose)
        self.browse_file.clicked.connect(self._browse_file)
        self.browse_folder.clicked.connect(self._browse_folder)
        self.use_demo.clicked.connect(lambda: self.choose(BUILTIN_DEMO_MODEL))
        self.layout_.addWidget(self.drop)

        # The current model.
        self.card, body = card()
        head = QHBoxLayout()
        head.setSpacing(s)
        self.card_icon = QLabel()
        self.name_label = QLabel()
        self.name_label.setObjectName("cardTitle")
        self.name_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.busy = BusyIndicator()
        head.addWidget(self.card_icon)
        head.addWidget(self.name_label, 1)
        head.addWidget(self.busy)
        body.addLayout(head)
        self.path_label = QLabel()
        self.path_label.setObjectName("muted")
        self.path_label.setWordWrap(True)
        self.path_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        body.addWidget(self.path_label)
        self.details = QFormLayout()
        self.details.setHorizontalSpacing(2 * s)
        self.details.setVerticalSpacing(s // 2)
        self.detail_labels: dict[str, QLabel] = {}
        for key, label in (("family", "Family"), ("prediction", "Predicts"), ("resolution", "Native size"),
                           ("format", "Format"), ("size", "Size"), ("precision", "Precision")):
            value = QLabel("—")
            value.setTextInteractionFlags(Qt.TextSelectableByMouse)
            self.detail_labels[key] = value
            self.details.addRow(label, value)
        body.addLayout(self.details)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setObjectName("muted")
        body.addWidget(self.note)
        self.banner = Banner(closable=False)
        self.use_native = self.banner.add_action(QPushButton("Use the native size"))
        self.use_native.clicked.connect(self._use_native_resolution)
        self.use_native.hide()
        body.addWidget(self.banner)
        # Parts a transformer-only file lacks (Flux: CLIP-L, T5, VAE), by the family's part names.
        self.parts = PartsPanel(model, tasks)
        self.parts.parts_changed.connect(self.state_changed.emit)
        body.addWidget(self.parts)
        self.layout_.addWidget(self.card)

        # Where else to pick from.
        lists = QHBoxLayout()
        lists.setSpacing(2 * s)
        self.recent_list = QListWidget()
        self.found_list = QListWidget()
        for title, lst, extra in (("Recent models", self.recent_list, None),
                                  ("Found on this computer", self.found_list, "refresh")):
            col = QVBoxLayout()
            col.setSpacing(s // 2)
            header = QHBoxLayout()
            header.setContentsMargins(0, 0, 0, 0)
            header_box = QWidget()
            header_box.setLayout(header)
            header_box.setMinimumHeight(QPushButton("x").sizeHint().height())  # both headers line up
            header.addWidget(section_label(title))
            header.addStretch(1)
            if extra:
                self.found_busy = BusyIndicator()
                header.addWidget(self.found_busy)
                self.refresh_button = QPushButton(theme.icon("refresh"), "Look again")
                self.refresh_button.clicked.connect(self.find_models)
                header.addWidget(self.refresh_button)
            col.addWidget(header_box)
            lst.setAlternatingRowColors(True)
            lst.setMaximumHeight(theme.em(self) * 12)  # a short list, not a page-high empty box
            lst.itemActivated.connect(self._pick_item)
            lst.itemDoubleClicked.connect(self._pick_item)
            col.addWidget(lst)
            lists.addLayout(col, 1)
        self.layout_.addLayout(lists)
        self.layout_.addStretch(1)

        model.changed.connect(self._on_changed)
        model.problems_changed.connect(lambda _: self._update_card())
        self._fill_recent()
        self._show_path(model.value("model.path"))

    # ---------------------------------------------------------------------------------------------- state

    def state(self) -> tuple[str, str]:
        errors = [p for p in self.model.errors() if page_for_field(p.field) == "model"]
        if not self.model.value("model.path"):
            return PENDING, "Choose a base model."
        if errors or self.inspect_error:
            return ATTENTION, errors[0].message if errors else self.inspect_error
        if self.parts.error:  # a file chosen for the wrong part: the sentence names the file and the field
            return ATTENTION, self.parts.error
        if self.parts.missing:
            return ATTENTION, "Choose the " + ", ".join(self.parts.missing) + "."
        return DONE, display_name(self.model.value("model.path"))

    def refresh_icons(self) -> None:
        super().refresh_icons()
        self.drop.refresh_icon()
        self._update_card()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._looked:
            self._looked = True
            self.find_models()

    # ---------------------------------------------------------------------------------------------- actions

    def choose(self, path: str) -> None:
        """Make ``path`` the job's base model (what a drop, a browse or a list pick does).

        The demo model comes with its recipe (its 64 px size, a learning rate and step count that visibly learn
        within a minute): choosing it applies them, so the page, Settings and a run agree with `lora-studio demo`.
        """
        if path == BUILTIN_DEMO_MODEL:
            from studio.engine.demo import demo_model_settings

            self.model.apply({"model.path": path, **demo_model_settings()})
            return
        self.model.set_value("model.path", path)

    def find_models(self) -> None:
        self.found_busy.start("Looking…")
        self.refresh_button.setEnabled(False)
        self.tasks.run("find", backend.find_models, stoppable=True, what="Looking for models",
                       on_done=self._show_found, on_error=lambda m, d: self._show_found([]),
                       on_finished=self._found_finished)

    def _found_finished(self) -> None:
        self.found_busy.stop()
        self.refresh_button.setEnabled(True)

    def _show_found(self, paths: list[Path]) -> None:
        self.found_list.clear()
        for p in paths:
            item = QListWidgetItem(theme.icon("model"), display_name(str(p)))
            item.setData(Qt.UserRole, str(p))
            item.setToolTip(str(p))
            self.found_list.addItem(item)
        if not paths:
            item = QListWidgetItem("No models in the usual A1111, ComfyUI or Hugging Face folders.")
            item.setFlags(Qt.NoItemFlags)
            self.found_list.addItem(item)

    def _fill_recent(self) -> None:
        self.recent_list.clear()
        demo = QListWidgetItem(theme.icon("sparkle"), "Built-in demo model (small, draws shapes; for trying the app)")
        demo.setData(Qt.UserRole, BUILTIN_DEMO_MODEL)
        self.recent_list.addItem(demo)
        for path in settings_store.read_list(RECENT_KEY):
            item = QListWidgetItem(theme.icon("model"), display_name(path))
            item.setData(Qt.UserRole, path)
            item.setToolTip(path)
            if not Path(path).exists():
                item.setText(f"{display_name(path)} (missing)")
                item.setFlags(Qt.NoItemFlags)
            self.recent_list.addItem(item)

    def _pick_item(self, item: QListWidgetItem) -> None:
        path = item.data(Qt.UserRole)
        if path:
            self.choose(path)

    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a base model", str(Path.home()),
                                              "Checkpoints (*.safetensors *.ckpt);;All files (*)")
        if path:
            self.drop.offer(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a diffusers model folder", str(Path.home()))
        if path:
            self.drop.offer(path)

    # ---------------------------------------------------------------------------------------------- display

    def _on_changed(self, path: str, value: Any) -> None:
        if path == "model.path":
            self._show_path(value)
        elif path == "dataset.resolution":
            self._update_card()

    def _show_path(self, path: str) -> None:
        self.info = None
        self.inspect_error = ""
        self.parts.show_for(None)
        self.tasks.cancel("inspect")
        if path and path != BUILTIN_DEMO_MODEL and Path(path).exists():
            settings_store.push_recent(RECENT_KEY, path)
            self._fill_recent()
        if path == BUILTIN_DEMO_MODEL:
            self._on_inspected(backend.inspect_model(path))  # known without reading anything
        elif path and Path(path).expanduser().exists():
            self.busy.start("Reading the model…")
            self.tasks.run("inspect", backend.inspect_model, path, engine=True, what="Reading the model",
                           on_done=self._on_inspected, on_error=self._on_inspect_failed,
                           on_finished=self.busy.stop)
        self._update_card()
        self.state_changed.emit()

    def _on_inspected(self, info: dict) -> None:
        self.info = info or {}
        kind = self.info.get("kind", "checkpoint")
        if kind not in ("checkpoint", "unknown"):
            what = {"lora": "a LoRA, not a base model", "dataset": "a folder of images, not a model"}.get(kind, f"a {kind}")
            self.inspect_error = f"This is {what}. Choose the Stable Diffusion checkpoint you generate with."
        elif self.info.get("usable") is False:
            self.inspect_error = _sentence(self.info.get("problem") or "This model cannot be trained on.")
        self.parts.show_for(self.info.get("family") if kind == "checkpoint" else None)
        self._update_card()
        self.state_changed.emit()

    def _on_inspect_failed(self, message: str, details: str) -> None:
        self.inspect_error = message
        self.banner.show_message("error", message, details)
        self._update_card()
        self.state_changed.emit()

    def _update_card(self) -> None:
        path = self.model.value("model.path")
        size = theme.em(self) * 2
        self.card_icon.setPixmap(theme.icon("sparkle" if path == BUILTIN_DEMO_MODEL else "model").pixmap(size, size))
        self.name_label.setText(display_name(path) if path else "No model chosen yet")
        self.path_label.setText("" if path == BUILTIN_DEMO_MODEL else path)
        self.path_label.setVisible(bool(path) and path != BUILTIN_DEMO_MODEL)
        info = self.info or {}
        notes = [DEMO_NOTE] if path == BUILTIN_DEMO_MODEL else [_sentence(str(n)) for n in info.get("notes") or []]
        self.note.setText("\n".join(notes))
        self.note.setVisible(bool(notes))
        family = info.get("family")
        self.detail_labels["family"].setText(info.get("family_label") or family or "—")
        self.detail_labels["format"].setText("built in" if info.get("builtin") else info.get("format_label") or "—")
        prediction = info.get("prediction_type")
        self.detail_labels["prediction"].setText(PREDICTION_NAMES.get(prediction, prediction or "—"))
        native = info.get("native_resolution")
        self.detail_labels["resolution"].setText(f"{native} px" if native else "—")
        size_text = format_bytes(info["size_bytes"]) if info.get("size_bytes") else "—"
        self.detail_labels["size"].setText(size_text)
        dtype = info.get("dtype")
        self.detail_labels["precision"].setText(DTYPE_NAMES.get(str(dtype), str(dtype)) if dtype else "—")

        errors = [p for p in self.model.errors() if page_for_field(p.field) == "model"]
        self.use_native.hide()
        if errors:
            self.banner.show_message("error", _sentence(errors[0].message))
        elif self.inspect_error:
            if self.banner.isHidden() or self.banner.kind != "error":
                self.banner.show_message("error", self.inspect_error)
        elif native and native != self.model.value("dataset.resolution"):
            self.banner.show_message(
                "info", f"This model was made for {native} px images; training is set to "
                        f"{self.model.value('dataset.resolution')} px.")
            self.use_native.setText(f"Train at {native} px")
            self.use_native.show()
        else:
            self.banner.hide()

    def _use_native_resolution(self) -> None:
        native = (self.info or {}).get("native_resolution")
        if native:
            self.model.set_value("dataset.resolution", int(native))


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")) if text else text
