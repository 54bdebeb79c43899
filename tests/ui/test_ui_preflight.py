"""Preflight in the window: a job that cannot run here is flagged on Settings before Start, in the CLI's words."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QTextDocument

from studio.cli import main
from studio.engine.config import optimizer_device_problem
from studio.engine.events import RunFailed
from ui_fakes import scripted_run

SENTENCE = optimizer_device_problem("adamw8bit", "cpu")


def shown(label) -> str:
    """What a person reads in a label: rich text is rendered (entities, tags), as Qt draws it."""
    rich = label.textFormat() == Qt.RichText or (label.textFormat() == Qt.AutoText and Qt.mightBeRichText(label.text()))
    if not rich:
        return label.text()
    doc = QTextDocument()
    doc.setHtml(label.text())
    return doc.toPlainText()


def test_8bit_adamw_on_the_cpu_is_flagged_on_settings_before_start(qtbot, make_window, tiny_dataset):
    window = make_window()
    window.model.set_value("dataset.path", str(tiny_dataset))
    window.model.set_device_type("cpu")  # what the window detects on a machine without an NVIDIA GPU
    window.go_to("settings")
    settings = window.settings_page
    settings.advanced.setChecked(True)
    optimizer = settings.editor("training.optimizer").input
    optimizer.setCurrentIndex(optimizer.findData("adamw8bit") if optimizer.findData("adamw8bit") >= 0
                              else optimizer.findText("adamw8bit"))
    assert window.model.value("training.optimizer") == "adamw8bit"
    assert settings.editor("training.optimizer").problem_text.rstrip(".") == SENTENCE
    assert settings.problem_count.text() == "1 setting to fix"
    assert not window.train_page.start_button.isEnabled()
    assert "8-bit AdamW" in window.train_page.checklist.text()
    # On a CUDA machine the same choice is fine.
    window.model.set_device_type("cuda")
    assert settings.editor("training.optimizer").problem_text == ""


def test_the_cli_refuses_with_the_same_sentence(tiny_sd1, tiny_dataset, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_sd1), "--data", str(tiny_dataset), "--out", str(tmp_path / "out"),
                 "--steps", "1", "--set", "training.optimizer=adamw8bit", "--set", "training.device=cpu"])
    assert code == 2
    assert f"error: training.optimizer: {SENTENCE}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_a_failure_with_quotes_reads_as_quotes_not_entities(qtbot, make_window, tiny_dataset, tmp_path):
    message = "Training failed: unknown optimizer 'adamw' & friends <b>bold</b>"
    window = make_window(scripted_run([RunFailed(message, "trace", tmp_path)]))
    window.model.set_value("dataset.path", str(tiny_dataset))
    window.start_training()
    qtbot.waitUntil(lambda: window.train_page.run_state == "failed" and not window.controller.running, timeout=10_000)
    text = shown(window.train_page.banner.text)
    assert message in text, text
    assert "&#x27;" not in text and "&amp;" not in text
