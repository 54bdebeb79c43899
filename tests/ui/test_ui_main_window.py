"""The window: step rail, status bar, job files, remembered state, shortcuts, help and about."""

from __future__ import annotations

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QDialog, QFileDialog, QMessageBox, QTextBrowser

from studio.engine import config
from studio.ui import settings_store
from studio.ui.main_window import about_html
from studio.ui.job_model import new_job


def test_rail_status_bar_and_pages(window):
    assert [window.rail.item(i).text() for i in range(window.rail.count())] == [
        "Model", "Dataset", "Settings", "Train", "Try & Export"]
    assert window.rail_state("model") == "done"  # the demo model
    assert window.rail_state("dataset") == "pending"
    assert window.rail.item(1).toolTip() == "Choose the folder with your training images."
    window.rail.setCurrentRow(2)
    assert window.current_page() == "settings"
    assert window.device_label.text() == "Device: CPU"
    assert window.job_label.text().startswith("Job: my-lora")
    assert window.run_label.text() == "Not started"
    window.model.set_value("output.name", "kitty")
    assert "kitty" in window.job_label.text() and "kitty" in window.windowTitle()


def test_device_is_detected_off_the_gui_thread(qtbot, make_window):
    window = make_window(detect_device=True)
    qtbot.waitUntil(lambda: window.device_label.text() == "Device: CPU (test)", timeout=5000)


def test_shortcuts(window):
    def keys(action):
        return [s.toString() for s in action.shortcuts()]

    assert "Ctrl+Return" in keys(window.start_action)
    assert keys(window.stop_action) == ["Esc"]
    assert keys(window.open_action) == [QKeySequence(QKeySequence.Open).toString()]
    assert keys(window.save_action) == [QKeySequence(QKeySequence.Save).toString()]
    assert "F1" in keys(window.help_action)


def test_save_and_open_job_files(qtbot, window, tmp_path, monkeypatch):
    path = tmp_path / "cats.toml"
    window.model.set_value("lora.rank", 12)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "cats"), ""))
    window.save_action.trigger()
    assert config.load_job(path).lora.rank == 12  # the CLI's format
    assert "cats.toml" in window.job_label.text() and not window.model.dirty

    window.model.set_value("lora.rank", 4)
    window.save_action.trigger()  # saves in place now, no dialog
    assert config.load_job(path).lora.rank == 4

    other = tmp_path / "dogs.toml"
    job = config.Job()
    job.output.name = "dogs"
    config.save_job(job, other)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(other), ""))
    window.open_action.trigger()
    assert window.model.job.output.name == "dogs"
    assert window.settings_page.editor("output.name").input.text() == "dogs"


def test_dropping_a_job_file_opens_it(qtbot, window, tmp_path):
    from ui_fakes import drop_paths

    job = config.Job()
    job.lora.rank = 20
    path = tmp_path / "dropped.toml"
    config.save_job(job, path)
    drop_paths(window, path)
    assert window.model.job.lora.rank == 20 and window.model.file_path == str(path)


def test_a_broken_job_file_is_explained(qtbot, window, tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nrnak = 3\n", encoding="utf-8")
    shown = {}
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: shown.update(title=title, text=text))
    assert not window.open_job(str(bad))
    assert "lora.rnak" in shown["text"] and "did you mean 'lora.rank'" in shown["text"]
    assert window.model.job.output.name == "my-lora"  # the current job is untouched


def test_unsaved_changes_are_offered_for_saving(qtbot, window, tmp_path, monkeypatch):
    path = tmp_path / "job.toml"
    window.model.save(path)
    window.model.set_value("lora.rank", 7)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Save)
    window.new_job()
    assert config.load_job(path).lora.rank == 7
    # the fresh job is the window's starting job (the demo's recipe), not the edited one
    assert window.model.job.lora.rank == new_job().lora.rank != 7 and window.model.file_path == ""


def test_window_and_last_job_are_remembered(qtbot, make_window, tiny_dataset):
    first = make_window()
    first.model.set_value("dataset.path", str(tiny_dataset))
    first.model.set_value("lora.rank", 24)
    first.go_to("settings")
    first.resize(1000, 700)
    size = first.size()
    first.close()
    second = make_window()
    assert second.model.job.lora.rank == 24
    assert second.model.job.dataset.path == str(tiny_dataset)
    qtbot.waitUntil(lambda: second.current_page() == "settings", timeout=2000)
    assert not settings_store.app_settings().value("window/geometry").isEmpty()
    assert second.size().height() == size.height()  # the width is clamped to the small offscreen screen


def test_help_and_about(qtbot, window):
    window.go_to("dataset")
    window.help_action.trigger()
    dialog = window.findChildren(QDialog)[-1]
    text = dialog.findChild(QTextBrowser).toPlainText()
    assert "trigger word" in text and "Ctrl+Return" in text
    dialog.close()
    about = about_html()
    for name in ("LoRA Studio", "PyTorch", "diffusers", "PEFT", "Qt"):
        assert name in about
