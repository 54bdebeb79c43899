"""Dataset page: drop a folder (and only a folder), thumbnails, captions edited in place, repeats, problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from ui_fakes import drop_paths


@pytest.fixture
def page(window):
    window.go_to("dataset")
    return window.dataset_page


def wait_scanned(qtbot, page):
    qtbot.waitUntil(lambda: page.scan is not None and not page.scanning, timeout=20_000)


def test_empty_state_says_what_to_drop(window, page):
    assert page.stack.currentWidget() is page.drop
    assert "Drop your image folder here" in page.drop.title.text()
    assert ".txt" in page.drop.subtitle.text()
    assert window.rail_state("dataset") == "pending"


def test_dropping_a_file_is_refused_politely(qtbot, window, page, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"png")
    with qtbot.waitSignal(page.drop.refused) as refused:
        drop_paths(page.drop, photo)
    assert "is a file" in refused.args[0] and "folder" in refused.args[0]
    assert page.drop.message.isVisible() and "photo.png" in page.drop.message.text()
    assert window.model.job.dataset.path == ""
    assert page.stack.currentWidget() is page.drop  # still the empty state, nothing half-loaded


def test_dropping_a_folder_scans_it_off_the_gui_thread(qtbot, window, page, tiny_dataset):
    drop_paths(page.drop, tiny_dataset)
    assert window.model.job.dataset.path == str(tiny_dataset)
    assert page.busy.active  # the indicator shows while the scan runs in its thread
    wait_scanned(qtbot, page)
    assert page.grid.count() == 4
    assert "4 images usable" in page.summary.text()
    assert window.rail_state("dataset") == "done"
    qtbot.waitUntil(lambda: all(not page.grid.item(i).icon().isNull() and
                                Path(page.grid.item(i).data(Qt.UserRole)) in page._thumbs
                                for i in range(page.grid.count())), timeout=20_000)
    captions = sorted(page.grid.item(i).text() for i in range(page.grid.count()))
    assert captions[0] == "a blue circle"
    assert page.buckets.topLevelItemCount() >= 1
    assert page.buckets.topLevelItem(0).text(1) == "4"
    tags = {page.tags.topLevelItem(i).text(0): page.tags.topLevelItem(i).text(1) for i in range(page.tags.topLevelItemCount())}
    assert tags["a red circle"] == "1"


def test_caption_edited_in_place_is_saved(qtbot, window, page, tiny_dataset):
    page.choose(str(tiny_dataset))
    wait_scanned(qtbot, page)
    item = next(page.grid.item(i) for i in range(page.grid.count()) if page.grid.item(i).data(Qt.UserRole).endswith("img_00.png"))
    item.setText("a red circle, shiny")
    assert (tiny_dataset / "img_00.txt").read_text(encoding="utf-8") == "a red circle, shiny"


def test_trigger_word_and_buckets_follow_the_job(qtbot, window, page, tiny_dataset):
    page.choose(str(tiny_dataset))
    wait_scanned(qtbot, page)
    qtbot.keyClicks(page.trigger.input, "zzshape")
    assert window.model.job.dataset.trigger_word == "zzshape"
    qtbot.waitUntil(lambda: page.scan is not None and page.scan.report.trigger_word == "zzshape" and not page.scanning,
                    timeout=20_000)
    tags = [page.tags.topLevelItem(i).text(0) for i in range(page.tags.topLevelItemCount())]
    assert "zzshape" in tags
    window.model.set_value("dataset.resolution", 256)
    assert page.buckets.topLevelItem(0).text(0) == "256 × 256 px"


def test_repeats_per_folder(qtbot, window, page, tmp_path, make_images):
    root = tmp_path / "set"
    make_images(root / "faces", count=2)
    make_images(root / "bodies", count=3, seed=1)
    page.choose(str(root))
    wait_scanned(qtbot, page)
    assert set(page.repeat_spins) == {"faces", "bodies"}
    page.repeat_spins["faces"].setValue(3)
    assert window.model.job.dataset.repeats == {"faces": 3}
    qtbot.waitUntil(lambda: not page.scanning and page.scan is not None and page.scan.report.images_per_epoch == 9,
                    timeout=20_000)
    window.model.set_value("dataset.repeats", {"faces": 2, "bodies": 4})
    qtbot.waitUntil(lambda: not page.scanning and page.repeat_spins["bodies"].value() == 4, timeout=20_000)


def test_problems_are_listed_with_what_happens(qtbot, window, page, tiny_dataset):
    (tiny_dataset / "broken.png").write_bytes(b"not an image at all")
    (tiny_dataset / "img_01.txt").unlink()
    page.choose(str(tiny_dataset))
    wait_scanned(qtbot, page)
    rows = {page.problems.topLevelItem(i).text(0): page.problems.topLevelItem(i) for i in range(page.problems.topLevelItemCount())}
    assert "broken.png" in rows and "skipped" in rows["broken.png"].text(2)
    assert "img_01.png" in rows
    assert page.tabs.tabText(1).startswith("Problems (")
    assert page.banner.isVisible()


def test_a_folder_without_images_needs_attention(qtbot, window, page, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    page.choose(str(empty))
    qtbot.waitUntil(lambda: window.rail_state("dataset") == "attention" and not page.scanning, timeout=20_000)
    assert page.banner.kind == "error"


def test_demo_images_come_with_their_settings(qtbot, window, page):
    qtbot.mouseClick(page.drop.buttons.itemAt(2).widget(), Qt.LeftButton)  # "Use the demo images"
    job = window.model.job
    assert Path(job.dataset.path).name == "dataset" and job.dataset.trigger_word == "studioshape"
    assert job.dataset.resolution == 64  # the demo model's size, since the demo model is chosen
    wait_scanned(qtbot, page)
    assert page.grid.count() == 8


def test_no_captions_and_no_trigger_word_is_a_warning_with_an_honest_tab_icon(qtbot, window, page, tiny_dataset):
    for caption in tiny_dataset.glob("*.txt"):
        caption.unlink()
    window.model.set_value("dataset.trigger_word", "")
    page.choose(str(tiny_dataset))
    wait_scanned(qtbot, page)
    rows = [page.problems.topLevelItem(i) for i in range(page.problems.topLevelItemCount())]
    folder = [r for r in rows if r.text(0) == "."]
    assert folder and "no trigger word" in folder[0].text(1) and "trigger word" in folder[0].text(2)
    assert page.tabs.tabText(1) == "Problems (1)" and page.problems_icon == "warning"
    assert page.banner.kind == "warning"
    # A trigger word answers it: the per-file notes stay (info), and the tab's icon says info, not a tick.
    window.model.set_value("dataset.trigger_word", "zzshape")
    qtbot.waitUntil(lambda: page.scan is not None and page.scan.report.trigger_word == "zzshape" and not page.scanning,
                    timeout=20_000)
    assert page.tabs.tabText(1) == "Problems" and page.problems_icon == "info"
