"""Settings page: widgets generated from field metadata, bound both ways, problems flagged at the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox

from studio.engine import config
from studio.ui import backend, presets


@pytest.fixture
def page(window):
    window.go_to("settings")
    return window.settings_page


def test_every_field_has_an_editor_with_help_range_and_choices(page):
    for info in config.iter_fields():
        if info.path in ("model.path", "dataset.path", "dataset.trigger_word", "dataset.repeats"):
            continue  # edited on the Model and Dataset pages
        editor = page.editor(info.path)
        assert editor.input.toolTip() == info.help
        w = editor.input
        if info.choices:
            assert isinstance(w, QComboBox)
            assert [w.itemText(i) for i in range(w.count())] == list(info.choices)
        elif info.type is bool:
            assert isinstance(w, QCheckBox)
        elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
            assert w.minimum() == pytest.approx(info.min)
            assert w.maximum() == pytest.approx(info.max)


def test_model_to_widgets(window, page):
    m = window.model
    m.set_value("lora.rank", 32)
    m.set_value("training.lr", 3e-4)
    m.set_value("training.optimizer", "prodigy")
    m.set_value("lora.train_text_encoder", True)
    m.set_value("sampling.prompts", ["a cat", "a dog"])
    m.set_value("output.name", "kitty")
    m.set_value("training.seed", 4_000_000_000)
    assert page.editor("lora.rank").input.value() == 32
    assert page.editor("training.lr").input.value() == pytest.approx(3e-4)
    assert page.editor("training.lr").input.text() == "0.0003"
    assert page.editor("training.optimizer").input.currentText() == "prodigy"
    assert page.editor("lora.train_text_encoder").input.isChecked()
    assert page.editor("sampling.prompts").input.toPlainText() == "a cat\na dog"
    assert page.editor("output.name").input.text() == "kitty"
    assert page.editor("training.seed").input.text() == "4000000000"


def test_widgets_to_model(qtbot, window, page):
    m = window.model
    page.editor("lora.rank").input.setValue(8)
    page.editor("training.scheduler").input.setCurrentText("cosine")
    page.editor("dataset.random_flip").input.click()
    name = page.editor("output.name").input
    name.selectAll()
    qtbot.keyClicks(name, "cat-lora")
    prompts = page.editor("sampling.prompts").input
    prompts.setPlainText("one\n\ntwo")
    lr = page.editor("training.lr").input
    lr.lineEdit().selectAll()
    qtbot.keyClicks(lr.lineEdit(), "2e-5")
    lr.editingFinished.emit()
    lr.interpretText()
    assert m.job.lora.rank == 8
    assert m.job.training.scheduler == "cosine"
    assert m.job.dataset.random_flip is True
    assert m.job.output.name == "cat-lora"
    assert m.job.sampling.prompts == ["one", "two"]
    assert m.job.training.lr == pytest.approx(2e-5)


def test_invalid_values_are_flagged_at_the_field_before_train(qtbot, window, page):
    m = window.model
    m.set_value("dataset.resolution", 100)  # not a multiple of 8
    editor = page.editor("dataset.resolution")
    assert editor.flagged and "multiple of 8" in editor.problem_text
    assert "1 setting to fix" in page.problem_count.text()
    assert not window.train_page.start_button.isEnabled()
    assert "Resolution" in window.train_page.checklist.text()
    assert window.rail_state("settings") == "attention"

    name = page.editor("output.name").input
    name.selectAll()
    qtbot.keyClicks(name, "bad/name")
    assert page.editor("output.name").flagged
    assert "letters, digits" in page.editor("output.name").problem_text

    m.set_value("dataset.resolution", 512)
    name.selectAll()
    qtbot.keyClicks(name, "good-name")
    assert not editor.flagged and editor.problem_text == ""
    assert not page.editor("output.name").flagged
    assert window.rail_state("settings") == "done"


def test_warnings_are_shown_but_do_not_block(window, page):
    window.model.set_value("lora.alpha", 512.0)
    editor = page.editor("lora.alpha")
    assert "far above rank" in editor.problem_text
    assert not editor.flagged  # flagged means "blocks training"
    assert window.rail_state("settings") == "done"


def test_text_that_cannot_be_read_is_flagged_locally(qtbot, window):
    from studio.ui.widgets.fields import FieldEditor

    editor = FieldEditor(window.model.field("dataset.repeats"), window.model)
    qtbot.addWidget(editor)
    qtbot.keyClicks(editor.input, "faces = 3, cats")
    assert editor.flagged and "name = number" in editor.error.text()
    assert window.model.job.dataset.repeats == {"faces": 3}  # the last readable value, nothing half-read
    qtbot.keyClicks(editor.input, " = 2")
    assert not editor.flagged
    assert window.model.job.dataset.repeats == {"faces": 3, "cats": 2}
    window.model.set_value("dataset.repeats", {"dogs": 5})
    assert editor.input.text() == "dogs = 5"


def test_advanced_settings_are_hidden_until_asked_for(window, page):
    advanced = page.editor("training.max_grad_norm")
    simple = page.editor("training.steps")
    assert advanced.isHidden() and not simple.isHidden()
    assert page.groups["model"][0].isHidden()  # only advanced settings there
    page.advanced.setChecked(True)
    assert not advanced.isHidden() and not page.groups["model"][0].isHidden()
    page.advanced.setChecked(False)
    # An advanced setting with a problem must be findable: the section opens by itself.
    window.model.set_value("dataset.bucket_step", 8)
    window.model.set_value("dataset.caption_extension", "txt")
    assert page.advanced.isChecked()
    assert page.editor("dataset.caption_extension").flagged


def test_builtin_and_user_presets(qtbot, window, page, monkeypatch):
    names = [page.preset_combo.itemText(i) for i in range(page.preset_combo.count())]
    assert names[1:4] == ["Quick test", "Balanced", "High quality"]
    page.preset_combo.setCurrentIndex(1)
    assert "check your images" in page.preset_description.text()
    qtbot.mouseClick(page.apply_button, Qt.LeftButton)
    assert window.model.job.lora.rank == 8 and window.model.job.training.steps == 200
    assert page.editor("lora.rank").input.value() == 8

    window.model.set_value("lora.rank", 24)
    monkeypatch.setattr("studio.ui.pages.settings_page.QInputDialog.getText", lambda *a, **k: ("My style", True))
    qtbot.mouseClick(page.save_preset_button, Qt.LeftButton)
    assert (presets.user_presets_dir() / "my-style.toml").is_file()
    assert page.preset_combo.currentText() == "My style (yours)"
    window.model.set_value("lora.rank", 4)
    qtbot.mouseClick(page.apply_button, Qt.LeftButton)
    assert window.model.job.lora.rank == 24
    monkeypatch.setattr("studio.ui.pages.settings_page.QMessageBox.question", lambda *a, **k: page_yes())
    qtbot.mouseClick(page.delete_preset_button, Qt.LeftButton)
    assert presets.user_presets() == []


def page_yes():
    from PySide6.QtWidgets import QMessageBox

    return QMessageBox.Yes


def test_estimate_shown_when_the_engine_has_one(qtbot, window, page, monkeypatch):
    fake = SimpleNamespace(seconds_per_step=0.42, total_seconds=200.0, gpu_memory_bytes=6_100_000_000,
                           gpu_total_bytes=24_000_000_000, device="NVIDIA Test GPU", warnings=["it may not fit"],
                           summary="")
    monkeypatch.setattr(backend, "estimate", lambda job: fake)
    window.model.set_value("training.steps", 480)
    qtbot.waitUntil(lambda: page.estimate_card.isVisible(), timeout=5000)
    assert "0.42 s per step" in page.estimate_label.text()
    assert "3 min 20 s in total" in page.estimate_label.text()
    assert "6.1 GB" in page.estimate_detail.text()
    assert "It may not fit." == page.estimate_warnings.text()
    monkeypatch.setattr(backend, "estimate", lambda job: None)
    window.model.set_value("training.steps", 500)
    qtbot.waitUntil(lambda: not page.estimate_card.isVisible(), timeout=5000)


def test_estimate_shows_its_measured_range_and_preview_cost(qtbot, window, page, monkeypatch):
    """A CPU estimate checked on held-out runs reads as the range they fell in; a GPU one says it is uncalibrated."""
    from studio.engine.estimate import Estimate

    cpu = Estimate(0.4, 500.0, 0.02, "CPU", total_steps=1000, previews=11, preview_seconds=100.0,
                   error_band=(-0.25, 0.5))
    monkeypatch.setattr(backend, "estimate", lambda job: cpu)
    window.model.set_value("training.steps", 481)
    qtbot.waitUntil(lambda: page.estimate_card.isVisible() and "–" in page.estimate_label.text(), timeout=5000)
    assert page.estimate_label.text() == "About 0.30 s–0.60 s per step · 6 min 15 s–12 min 30 s in total"
    assert "previews about 1 min 40 s" in page.estimate_detail.text()
    assert "not fitted on" in page.estimate_detail.text()
    gpu = Estimate(0.05, 60.0, 2.0, "NVIDIA Test GPU", total_steps=1000)
    monkeypatch.setattr(backend, "estimate", lambda job: gpu)
    window.model.set_value("training.steps", 482)
    qtbot.waitUntil(lambda: "uncalibrated" in page.estimate_detail.text(), timeout=5000)
    assert page.estimate_label.text() == "About 0.05 s per step · 1 min in total"


def test_each_family_has_a_preset_with_its_resolution_and_preview_sampler(qtbot, window, page):
    names = [page.preset_combo.itemText(i) for i in range(page.preset_combo.count())]
    assert {"SD 1.x defaults", "SDXL defaults", "SD3 Medium defaults", "SD3.5 Large defaults"} <= set(names)
    page.preset_combo.setCurrentIndex(names.index("SD3.5 Large defaults"))
    assert "Stable Diffusion 3.5 Large" in page.preset_description.text()
    qtbot.mouseClick(page.apply_button, Qt.LeftButton)
    job = window.model.job
    assert (job.dataset.resolution, job.sampling.steps, job.sampling.guidance) == (1024, 28, 3.5)
    assert (job.lora.rank, job.training.lr, job.training.min_snr_gamma) == (16, 1e-4, 0.0)
    assert page.editor("dataset.resolution").input.value() == 1024


def test_the_z_image_preset_samples_like_turbo_and_trains_at_the_models_shift(qtbot, window, page):
    names = [page.preset_combo.itemText(i) for i in range(page.preset_combo.count())]
    page.preset_combo.setCurrentIndex(names.index("Z-Image defaults"))
    assert "Z-Image" in page.preset_description.text()
    qtbot.mouseClick(page.apply_button, Qt.LeftButton)
    job = window.model.job
    # Turbo's sampler: 8 steps without guidance; rank 16, lr 1e-4, logit-normal σ at the model's own shift.
    assert (job.dataset.resolution, job.sampling.steps, job.sampling.guidance) == (1024, 8, 0.0)
    assert (job.lora.rank, job.training.lr, job.training.flow_shift) == (16, 1e-4, "auto")
    assert job.training.gradient_checkpointing and job.training.base_weights_fp8
    assert page.editor("sampling.steps").input.value() == 8
