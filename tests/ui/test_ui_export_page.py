"""Try & Export page with engine fakes: empty state, choosing a LoRA, side-by-side generation, export errors."""

from __future__ import annotations

import pytest
from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog

from studio.ui import backend
from ui_fakes import drop_paths, write_lora_stub


@pytest.fixture
def page(window, monkeypatch):
    monkeypatch.setattr(backend, "describe_lora", lambda path: {"rank": 8, "alpha": 4.0, "steps": 300,
                                                               "family": "sd1", "family_short_label": "SD 1.x", "size_bytes": 9_800_000,
                                                               "title": "Cats", "trigger_phrase": "zzcat",
                                                               "metadata": {"modelspec.description": "Fluffy."}})
    window.go_to("export")
    return window.export_page


def test_empty_state_and_refusing_other_files(qtbot, page, tmp_path):
    assert page.stack.currentWidget() is page.drop
    assert "Train a LoRA" in page.drop.subtitle.text()
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with qtbot.waitSignal(page.drop.refused):
        drop_paths(page.drop, other)
    assert page.stack.currentWidget() is page.drop


def test_run_folder_lists_final_and_intermediate_loras(qtbot, window, page, tmp_path):
    run = tmp_path / "run"
    final = write_lora_stub(run / "cats.safetensors")
    write_lora_stub(run / "cats-step000100.safetensors")
    write_lora_stub(run / "cats-step000200.safetensors")
    write_lora_stub(run / "cats-diffusers.safetensors")
    page.set_run(run, final)
    labels = [page.lora_combo.itemText(i) for i in range(page.lora_combo.count())]
    assert labels == ["cats.safetensors — final", "cats-step000200.safetensors — step 200",
                      "cats-step000100.safetensors — step 100"]
    assert page.selected_lora() == final
    qtbot.waitUntil(lambda: page.info is not None, timeout=5000)
    assert page.lora_info.text() == "rank 8, alpha 4 · 300 steps · for SD 1.x · 9.8 MB"
    assert page.title_edit.text() == "Cats" and page.trigger_edit.text() == "zzcat"
    assert page.description_edit.toPlainText() == "Fluffy."


def test_generate_side_by_side_off_the_gui_thread(qtbot, window, page, tmp_path, monkeypatch):
    calls = {}

    def fake_pair(cache, model, lora, prompt, **kw):
        calls.update(kw, prompt=prompt, lora=lora)
        return Image.new("RGB", (64, 64), "gray"), Image.new("RGB", (64, 64), "red")

    monkeypatch.setattr(backend, "generate_pair", fake_pair)
    lora = write_lora_stub(tmp_path / "cats.safetensors")
    drop_paths(page.drop, lora)
    assert page.selected_lora() == lora
    page.prompt.setText("zzcat on a sofa")
    page.strength.setValue(80)
    assert page.strength_label.text() == "0.80×" and "0.80×" in page.lora_panel.title.text()
    qtbot.mouseClick(page.generate_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.lora_panel.pixmap is not None, timeout=5000)
    assert calls["strength"] == pytest.approx(0.8) and calls["prompt"] == "zzcat on a sofa"
    assert calls["seed"] == page.seed.value()
    assert page.base_panel.pixmap.toImage().pixelColor(1, 1).red() == 128


def test_generation_failure_is_readable(qtbot, page, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(backend, "generate_pair", broken)
    page.add_file(str(write_lora_stub(tmp_path / "cats.safetensors")))
    page.prompt.setText("zzcat")
    page.generate()
    qtbot.waitUntil(lambda: page.try_banner.isVisible(), timeout=5000)
    assert page.try_banner.kind == "error" and page.generate_button.isEnabled()


def test_export_failure_is_readable_and_nothing_is_claimed(qtbot, page, tmp_path, monkeypatch):
    page.add_file(str(write_lora_stub(tmp_path / "cats.safetensors")))
    target = tmp_path / "out" / "cats"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    qtbot.mouseClick(page.export_button, Qt.LeftButton)  # the stub is not a real LoRA: the engine refuses it
    qtbot.waitUntil(lambda: page.export_banner.isVisible(), timeout=30_000)
    assert page.export_banner.kind == "error"
    assert "cats.safetensors" in page.export_banner.text.text()
    assert page.exported is None and not (tmp_path / "out" / "cats.safetensors").exists()
