"""`lora-studio screenshots DIR` renders every page to a PNG."""

from __future__ import annotations

from PySide6.QtGui import QImage

from studio.cli import main


def test_screenshots_command_renders_every_page(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_THEME", "light")  # the command sets these; the test must not leak them
    monkeypatch.setenv("LORA_STUDIO_DATA", str(tmp_path / "data"))
    out = tmp_path / "shots"
    assert main(["screenshots", str(out), "--no-train", "--size", "1000x700"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["caption_dialog.png", "dataset.png", "dataset_tags.png", "model.png", "queue.png", "settings.png",
                     "train.png", "try_and_export.png"]
    queue = QImage(str(out / "queue.png"))
    assert queue.width() > 1000  # the window with the queue dock beside the page
    image = QImage(str(out / "dataset.png"))
    assert (image.width(), image.height()) == (1000, 700)
