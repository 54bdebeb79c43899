"""An over-long caption file shows its start, is flagged in Problems, and cannot be cut short by an in-place edit."""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_big_captions import big_caption_dataset  # noqa: E402


def test_a_huge_caption_is_shown_flagged_and_not_editable(qtbot, window, tmp_path):
    folder = big_caption_dataset(tmp_path / "data", megabytes=1)
    size = (folder / "big.txt").stat().st_size
    window.go_to("dataset")
    page = window.dataset_page
    page.choose(str(folder))
    qtbot.waitUntil(lambda: page.scan is not None and not page.scanning, timeout=20_000)
    items = {Path(page.grid.item(i).data(Qt.UserRole)).name: page.grid.item(i) for i in range(page.grid.count())}
    big, small = items["big.png"], items["small.png"]
    assert big.text().startswith("a red square") and len(big.text()) <= 4096
    assert not big.flags() & Qt.ItemIsEditable and "Edit it in a text editor" in big.toolTip()
    assert small.flags() & Qt.ItemIsEditable
    rows = {page.problems.topLevelItem(i).text(0): page.problems.topLevelItem(i) for i in range(page.problems.topLevelItemCount())}
    assert "caption truncated to its first" in rows["big.png"].text(1)
    assert (folder / "big.txt").stat().st_size == size
