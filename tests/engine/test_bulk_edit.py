"""Bulk caption editing: tag frequency, add/remove/replace/move/trigger over {key: caption}, and exact undo."""

from __future__ import annotations

from studio.engine.captioning.bulk_edit import (
    UndoJournal, add_tag, insert_trigger, move_to_front, remove_tag, replace_tag, tag_frequency, write_edit,
)

CAPTIONS = {"a": "ohwx, red circle, flat", "b": "blue  square, flat, flat", "c": "", "d": "a photo of Red circle"}


def test_tag_frequency_counts_each_tag_once_per_caption_split_on_commas():
    assert tag_frequency(CAPTIONS) == [("flat", 2), ("a photo of Red circle", 1), ("blue square", 1),
                                       ("ohwx", 1), ("red circle", 1)]


def test_each_operation_returns_only_the_captions_it_changes():
    assert add_tag(CAPTIONS, "flat") == {"c": "flat", "d": "a photo of Red circle, flat"}
    assert add_tag(CAPTIONS, "new", front=True)["a"] == "new, ohwx, red circle, flat"
    assert remove_tag(CAPTIONS, "flat") == {"a": "ohwx, red circle", "b": "blue square"}
    assert replace_tag(CAPTIONS, "red circle", "crimson circle") == {"a": "ohwx, crimson circle, flat"}
    assert replace_tag({"x": "red, crimson, big"}, "red", "crimson") == {"x": "crimson, big"}  # no duplicate
    assert replace_tag(CAPTIONS, "Red", "red") == {}  # case matters: "Red" alone is no tag here
    assert move_to_front(CAPTIONS, "flat") == {"a": "flat, ohwx, red circle", "b": "flat, blue square"}
    assert insert_trigger(CAPTIONS, "ohwx") == {"b": "ohwx, blue square, flat, flat", "c": "ohwx",
                                                "d": "ohwx, a photo of Red circle"}


def test_undo_restores_the_exact_bytes_of_every_file_level_by_level(tmp_path):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"red circle,\r\nflat\r\n")
    legacy = tmp_path / "legacy.txt"
    legacy.write_bytes("caf\xe9, flat".encode("cp1252"))
    missing = tmp_path / "new.txt"
    originals = {crlf: crlf.read_bytes(), legacy: legacy.read_bytes()}
    texts = {crlf: "red circle, flat", legacy: "café, flat", missing: ""}
    journal = UndoJournal()
    first = write_edit(replace_tag(texts, "flat", "flat color"), "Replace flat")
    journal.push(first)
    assert crlf.read_text() == "red circle, flat color" and legacy.read_text(encoding="utf-8") == "café, flat color"
    second = write_edit(add_tag({p: p.read_text(encoding="utf-8") if p.exists() else "" for p in texts}, "x"), "Add x")
    journal.push(second)
    assert missing.read_text() == "x" and len(journal) == 2 and journal.next_label == "Add x"

    edit, result = journal.undo()
    assert edit.label == "Add x" and not missing.exists() and len(result.restored) == 3
    assert crlf.read_text() == "red circle, flat color"
    crlf.write_text("edited by hand since")
    edit, result = journal.undo()
    assert edit.label == "Replace flat" and legacy.read_bytes() == originals[legacy]
    assert [(p, why) for p, why in result.kept] == [(crlf, "changed since, so it was left as it is now")]
    assert crlf.read_text() == "edited by hand since" and not journal.can_undo and journal.undo() is None
