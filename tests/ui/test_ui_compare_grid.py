"""Try & Export's Compare steps grid on a real run: rows = saved steps, columns = strengths, cached, clickable."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from fixtures_runs import make_tiny_run
from studio.engine.grid import GRID_FOLDER
from studio.ui.widgets.gallery import ImageDialog


@pytest.fixture(scope="module")
def run_dir(tiny_sd1, tmp_path_factory):
    from fixtures_data import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("data"))
    return make_tiny_run(tiny_sd1, data, tmp_path_factory.mktemp("runs") / "run")


def test_grid_of_saved_steps_renders_in_the_background_and_picks_a_step(qtbot, window, run_dir, tiny_sd1):
    window.model.set_value("model.path", str(tiny_sd1))
    window.go_to("export")
    page = window.export_page
    page.set_run(run_dir, run_dir / "tiny.safetensors")
    page.try_tabs.setCurrentIndex(1)
    grid = page.grid
    assert grid.prompt.currentText() == "zzshape, a red circle"  # the run's preview prompt
    assert [r.label for r in grid.rows] == ["step 2", "step 4 (final)"]
    grid.strengths.setText("0, 1")
    qtbot.mouseClick(grid.render_button, Qt.LeftButton)
    assert grid.rendering and grid.busy.active and not grid.render_button.isEnabled()
    qtbot.waitUntil(lambda: grid.grid is not None and not grid.rendering, timeout=120_000)
    assert len(grid.cells) == 4 and all(c.pixmap_ is not None for c in grid.cells.values())
    assert "step 4 (final) · strength 1" in grid.cells[(1, 1)].caption
    assert len(list((run_dir / GRID_FOLDER).glob("*.png"))) >= 3

    # A click enlarges a cell.
    qtbot.mouseClick(grid.cells[(0, 1)], Qt.LeftButton)
    dialogs = [d for d in grid.findChildren(ImageDialog) if d.isVisible()]
    assert len(dialogs) == 1 and "step 2" in dialogs[0].findChildren(type(grid.note))[-1].text()
    dialogs[0].close()

    # Any saved step can be chosen for export, not only the last.
    step_button = grid.layout_grid.itemAtPosition(1, 0).widget()
    assert step_button.text() == "step 2"
    qtbot.mouseClick(step_button, Qt.LeftButton)
    assert page.selected_lora() == run_dir / "tiny-step000002.safetensors"

    # Drawn again: every cell comes from the run folder's cache, without loading the model.
    page.cache.clear()
    qtbot.mouseClick(grid.render_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not grid.rendering, timeout=30_000)
    assert page.cache._key is None and all(c.pixmap_ is not None for c in grid.cells.values())


def test_bad_strengths_are_a_sentence_and_nothing_runs(qtbot, window, run_dir):
    window.go_to("export")
    page = window.export_page
    page.set_run(run_dir, run_dir / "tiny.safetensors")
    page.grid.strengths.setText("0, lots")
    qtbot.mouseClick(page.grid.render_button, Qt.LeftButton)
    assert not page.grid.rendering
    assert page.grid.banner.kind == "warning" and "'lots' is not a number" in page.grid.banner.text.text()
