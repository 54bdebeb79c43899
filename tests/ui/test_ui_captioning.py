"""The Caption… dialog and the Tags panel, driven like a user: each tiny model on the demo images, row-level
accept/edit, confirmed writes with backups, cancel mid-way, download consent, bulk replace with undo, and the
CLI writing the same captions as the window."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import Qt

from studio.engine.captioning import BACKUP_FOLDER


@pytest.fixture
def page(window):
    window.go_to("dataset")
    return window.dataset_page


def load(qtbot, page, folder):
    page.model.set_value("dataset.trigger_word", "studioshape")
    page.choose(str(folder))
    qtbot.waitUntil(lambda: page.scan is not None and not page.scanning, timeout=20_000)


def open_dialog(qtbot, page, model_folder, **options):
    qtbot.mouseClick(page.caption_button, Qt.LeftButton)
    dialog = page.caption_dialog
    assert dialog is not None and dialog.isVisible()
    qtbot.waitUntil(lambda: not dialog.tasks.is_running("caption-models") and bool(dialog.entries), timeout=20_000)
    assert dialog.add_model_folder(model_folder)
    qtbot.waitUntil(lambda: dialog.current_entry() is not None and dialog.current_entry().ref == str(model_folder),
                    timeout=20_000)
    for name, value in options.items():
        dialog.set_option(name, value)
    return dialog


def run_dialog(qtbot, dialog):
    qtbot.mouseClick(dialog.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not dialog.running and not dialog.tasks.is_running("caption"), timeout=60_000)


def texts(folder):
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


@pytest.mark.parametrize("kind", ["tagger", "blip", "florence2"])
def test_caption_the_demo_dataset_check_rows_write_and_undo(kind, qtbot, page, demo_copy, tiny_captioners):
    load(qtbot, page, demo_copy)
    old = texts(demo_copy)
    dialog = open_dialog(qtbot, page, tiny_captioners[kind], mode="replace", general_threshold=0.5, max_tokens=10)
    assert dialog.option_widgets["prefix"].text() == "studioshape"  # the job's trigger word
    assert dialog.option_widgets["general_threshold"].isHidden() == (kind != "tagger")
    assert dialog.option_widgets["florence_task"].isHidden() == (kind != "florence2")
    run_dialog(qtbot, dialog)
    rows = dialog.rows()
    assert len(rows) == 8 and "8 captions proposed" in dialog.status.text()
    assert texts(demo_copy) == old  # the preview writes nothing
    assert all(dialog.table.item(r, 3).text().startswith("studioshape, ") for r, _ in rows)
    dialog.table.item(rows[1][0], 0).setCheckState(Qt.Unchecked)  # reject one row
    dialog.table.item(rows[2][0], 3).setText("studioshape, my own words")  # edit another
    assert dialog.write_button.text() == "Write 7 captions"
    asked = []
    dialog.confirm = lambda title, text: asked.append(text) or False
    qtbot.mouseClick(dialog.write_button, Qt.LeftButton)
    assert "7 images already have a caption" in asked[0] and texts(demo_copy) == old  # declined: nothing written
    dialog.confirm = lambda title, text: True
    qtbot.mouseClick(dialog.write_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: "Wrote 7 caption files" in dialog.status.text(), timeout=20_000)
    new = texts(demo_copy)
    assert new["shape_01.txt"] == old["shape_01.txt"] and new["shape_02.txt"] == "studioshape, my own words"
    assert new["shape_00.txt"] == dialog.table.item(rows[0][0], 3).text() != old["shape_00.txt"]
    backups = list((demo_copy / BACKUP_FOLDER).glob("*/*.txt"))
    assert len(backups) == 7 and all(b.read_text() == old[b.name] for b in backups)
    # The doctor re-read the folder: the grid shows the new captions, and the backups are no images or captions.
    qtbot.waitUntil(lambda: not page.scanning and page.scan.report.usable == 8 and
                    {i.caption for i in page.scan.report.items} >= {"studioshape, my own words"}, timeout=20_000)
    assert page.tag_panel.undo_button.isEnabled() and "Write captions" in page.tag_panel.undo_button.text()
    dialog.close()
    qtbot.mouseClick(page.tag_panel.undo_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: texts(demo_copy) == old and not page.tasks.is_running("bulk-edit"), timeout=20_000)


def test_cancel_mid_way_keeps_the_proposals_so_far(qtbot, page, tmp_path, make_images, tiny_captioners, monkeypatch):
    from studio.engine.captioning.blip import BlipCaptioner

    real = BlipCaptioner.caption
    monkeypatch.setattr(BlipCaptioner, "caption",
                        lambda self, images, options: (time.sleep(0.3), real(self, images, options))[1])
    folder = make_images(tmp_path / "many", count=16)
    load(qtbot, page, folder)
    old = texts(folder)
    dialog = open_dialog(qtbot, page, tiny_captioners["blip"], mode="replace", max_tokens=6)
    qtbot.mouseClick(dialog.run_button, Qt.LeftButton)  # 4 images a batch: the stop is checked between batches
    qtbot.waitUntil(lambda: len(dialog.rows()) >= 1, timeout=30_000)
    assert dialog.cancel_button.isEnabled()
    qtbot.mouseClick(dialog.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    n = len(dialog.rows())
    assert 4 <= n < 16 and f"Stopped after {n} images" in dialog.status.text()
    assert texts(folder) == old and dialog.write_button.isEnabled()


def test_a_model_not_on_this_computer_is_offered_with_its_size_and_not_downloaded_when_declined(
        qtbot, page, demo_copy, monkeypatch):
    from studio.engine.captioning import hub

    monkeypatch.setattr(hub, "download", lambda *a, **kw: pytest.fail("downloaded without consent"))
    load(qtbot, page, demo_copy)
    qtbot.mouseClick(page.caption_button, Qt.LeftButton)
    dialog = page.caption_dialog
    qtbot.waitUntil(lambda: bool(dialog.entries), timeout=20_000)
    index = next(i for i, e in enumerate(dialog.entries) if e.ref == "SmilingWolf/wd-swinv2-tagger-v3")
    dialog.model_box.setCurrentIndex(index)
    assert not dialog.current_entry().on_disk and "467.8 MB" in dialog.model_note.text()
    assert dialog.run_button.text() == "Download and propose…"
    asked = []
    dialog.confirm = lambda title, text: asked.append(text) or False
    qtbot.mouseClick(dialog.run_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: bool(asked) and not dialog.running, timeout=20_000)
    assert "SmilingWolf/wd-swinv2-tagger-v3" in asked[0] and "467.8 MB" in asked[0] and "only download" in asked[0]
    assert dialog.status.text() == "Nothing was downloaded." and dialog.table.rowCount() == 0


def test_a_folder_without_a_model_is_refused_with_a_sentence(qtbot, page, demo_copy, tiny_captioners):
    load(qtbot, page, demo_copy)
    qtbot.mouseClick(page.caption_button, Qt.LeftButton)
    dialog = page.caption_dialog
    assert not dialog.add_model_folder(demo_copy)
    assert dialog.banner.isVisible() and "holds no captioning model" in dialog.banner.text.text()


def test_bulk_replace_and_remove_then_undo_each(qtbot, page, demo_copy, monkeypatch):
    from PySide6.QtWidgets import QInputDialog

    load(qtbot, page, demo_copy)
    raw = {p.name: p.read_bytes() for p in demo_copy.glob("*.txt")}
    counts = lambda: {page.tags.topLevelItem(i).text(0): page.tags.topLevelItem(i).text(1)  # noqa: E731
                      for i in range(page.tags.topLevelItemCount())}
    assert counts()["striped"] == "8"
    assert page.tag_panel.select_tag("striped")
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **kw: ("flat color", True))
    qtbot.mouseClick(page.tag_panel.replace_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not page.scanning and not page.tasks.is_running("bulk-edit") and
                    counts().get("flat color") == "8", timeout=20_000)
    assert "striped" not in counts()
    assert (demo_copy / "shape_00.txt").read_text() == "studioshape, a red circle, flat color, black outline"
    assert page.remove_tag("black outline")
    qtbot.waitUntil(lambda: not page.scanning and not page.tasks.is_running("bulk-edit") and
                    "black outline" not in counts(), timeout=20_000)
    assert page.tag_panel.undo_button.text() == "Undo: Remove “black outline”"
    qtbot.mouseClick(page.tag_panel.undo_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not page.scanning and not page.tasks.is_running("bulk-edit") and
                    counts().get("black outline") == "8", timeout=20_000)
    assert page.tag_panel.undo_button.text() == "Undo: Replace “striped” with “flat color”"
    qtbot.mouseClick(page.tag_panel.undo_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not page.scanning and not page.tasks.is_running("bulk-edit") and
                    counts().get("striped") == "8", timeout=20_000)
    assert {p.name: p.read_bytes() for p in demo_copy.glob("*.txt")} == raw  # byte for byte
    assert not page.tag_panel.undo_button.isEnabled()


def test_the_cli_writes_the_same_captions_as_the_window(qtbot, page, tmp_path, tiny_captioners):
    import shutil

    from studio.cli import main
    from studio.paths import resource_path

    gui_copy = shutil.copytree(resource_path("demo", "dataset"), tmp_path / "gui")
    cli_copy = shutil.copytree(resource_path("demo", "dataset"), tmp_path / "cli")
    load(qtbot, page, gui_copy)
    dialog = open_dialog(qtbot, page, tiny_captioners["tagger"], mode="append", general_threshold=0.45,
                         characters="mixed", exclude_tags="no humans", max_tags=3)
    run_dialog(qtbot, dialog)
    dialog.confirm = lambda title, text: True
    qtbot.mouseClick(dialog.write_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: "Wrote" in dialog.status.text(), timeout=20_000)
    assert main(["caption", str(cli_copy), "--model", str(tiny_captioners["tagger"]), "--mode", "append",
                 "--prefix", "studioshape", "--general-threshold", "0.45", "--characters", "mixed",
                 "--exclude-tags", "no humans", "--max-tags", "3", "--yes", "--quiet"]) == 0
    gui, cli = texts(gui_copy), texts(cli_copy)
    assert gui == cli and len(gui) == 8
    assert all(t.startswith("studioshape, a ") and t.count(", ") > 3 for t in gui.values())
