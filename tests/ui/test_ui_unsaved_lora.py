"""The window after a full disk at the final export: "Save LoRA elsewhere…" saves the trained LoRA kept in memory."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog
from safetensors.torch import load_file

from fixtures_disk import fail_publishing
from test_ui_real_engine import set_up_job, wait_until_done

pytestmark = pytest.mark.real_engine


def test_save_lora_elsewhere_after_a_full_disk(qtbot, make_window, tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "circles"
    full_too = tmp_path / "full-stick" / "mine.safetensors"
    good = tmp_path / "big-disk" / "mine.safetensors"
    good.parent.mkdir()
    fail_publishing(monkeypatch, out / "my-lora.safetensors", full_too)
    window = make_window()  # the real trainer
    set_up_job(window, tiny_sd1, tiny_dataset, out, steps=2, sample_every=0)
    page = window.train_page
    qtbot.mouseClick(page.start_button, Qt.LeftButton)
    wait_until_done(qtbot, window, "finished", "failed")
    assert page.run_state == "failed"
    assert "disk is full" in page.banner.text.text() and "kept in memory" in page.banner.text.text()
    assert page.rescue_button.isVisible() and not (out / "my-lora.safetensors").exists()

    answers = iter([str(full_too), str(good)])
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (next(answers), "")))
    qtbot.mouseClick(page.rescue_button, Qt.LeftButton)  # a target that is full as well
    qtbot.waitUntil(lambda: page.rescue_button.isEnabled() and page.banner.kind == "error"
                    and "full-stick" in page.banner.text.text(), timeout=30_000)
    assert "still in memory" in page.banner.text.text() and page.rescue_button.isVisible()
    assert not full_too.exists()

    qtbot.mouseClick(page.rescue_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.banner.kind == "success", timeout=30_000)
    assert str(good) in page.banner.text.text() and not page.rescue_button.isVisible()
    assert load_file(good) and page.unsaved is None and page.try_button.isVisible()
    assert window.export_page.run_dir == out
