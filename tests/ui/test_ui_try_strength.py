"""Try & Export's strength slider: the LoRA picture is marked stale at once and made again when the slider rests."""

from __future__ import annotations

from PIL import Image
from PySide6.QtCore import Qt

from studio.ui import backend
from ui_fakes import drop_paths, write_lora_stub


def test_moving_the_strength_regenerates_only_the_lora_picture_once_it_rests(qtbot, window, tmp_path, monkeypatch):
    pairs, singles = [], []

    def fake_pair(cache, model, lora, prompt, **kw):
        pairs.append(kw["strength"])
        return Image.new("RGB", (64, 64), "gray"), Image.new("RGB", (64, 64), (int(100 * kw["strength"]), 0, 0))

    def fake_single(cache, model, lora, prompt, **kw):
        singles.append(kw["strength"])
        return Image.new("RGB", (64, 64), (int(100 * kw["strength"]), 0, 0))

    monkeypatch.setattr(backend, "generate_pair", fake_pair)
    monkeypatch.setattr(backend, "generate_with_lora", fake_single)
    monkeypatch.setattr(backend, "describe_lora", lambda path: {})
    window.go_to("export")
    page = window.export_page
    drop_paths(page.drop, write_lora_stub(tmp_path / "cats.safetensors"))
    page.prompt.setText("zzcat on a sofa")
    qtbot.mouseClick(page.generate_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: page.lora_image is not None and not page.tasks.is_running("generate"), timeout=10_000)
    assert pairs == [1.0] and page.lora_panel.title.text() == "With LoRA at 1.00×"

    # Dragging the slider: the picture still shows 1.00× and says so, dimmed, until the new one arrives.
    for value in (110, 125, 150):
        page.strength.setValue(value)
    assert page.lora_panel.stale
    assert page.lora_panel.title.text() == "With LoRA at 1.00× — updating to 1.50×…"
    qtbot.waitUntil(lambda: not page.lora_panel.stale and not page.tasks.is_running("generate"), timeout=10_000)
    assert singles == [1.5]  # one picture for where the slider came to rest, and the base was not made again
    assert pairs == [1.0]
    assert page.lora_panel.title.text() == "With LoRA at 1.50×"
    assert page.lora_image.getpixel((0, 0)) == (150, 0, 0)

    # A new seed makes the base picture stale too: the next strength change makes both again.
    page.seed.setValue(99)
    page.strength.setValue(50)
    qtbot.waitUntil(lambda: len(pairs) == 2 and not page.tasks.is_running("generate"), timeout=10_000)
    assert pairs == [1.0, 0.5] and singles == [1.5]
    assert page.lora_panel.title.text() == "With LoRA at 0.50×" and not page.lora_panel.stale


def test_before_the_first_picture_the_slider_only_relabels(qtbot, window, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "generate_pair", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(backend, "describe_lora", lambda path: {})
    window.go_to("export")
    page = window.export_page
    drop_paths(page.drop, write_lora_stub(tmp_path / "cats.safetensors"))
    page.strength.setValue(70)
    qtbot.wait(page.regenerate_timer.interval() + 100)
    assert calls == [] and not page.lora_panel.stale
    assert page.lora_panel.title.text() == "With LoRA at 0.70×"
