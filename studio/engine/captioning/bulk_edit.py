"""Bulk caption editing: tag frequency and add/remove/replace/move over {key: caption}, and an undo journal.

The tag functions are pure: they take and return ``{key: caption}`` and only the captions they change appear in
the result. Tags are split on commas as kohya does; a tag matches when its text is the same after trimming and
folding runs of spaces. Case matters: 'Red' and 'red' stay two tags, as they are two strings in the files, and a
silent merge of what someone wrote on purpose would surprise them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Mapping, TypeVar

from studio.engine.captions import decode_caption, has_trigger, split_tags
from studio.engine.fileio import atomic_write_bytes

K = TypeVar("K", bound=Hashable)


def _norm(tag: str) -> str:
    return " ".join(tag.split())


def _join(tags: list[str]) -> str:
    return ", ".join(tags)


def tag_frequency(captions: Mapping[K, str]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most frequent first; a tag twice in one caption counts once."""
    counts: Counter[str] = Counter()
    for text in captions.values():
        counts.update({_norm(t) for t in split_tags(text)})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _changed(before: Mapping[K, str], after: dict[K, str]) -> dict[K, str]:
    return {k: v for k, v in after.items() if v != before[k]}


def add_tag(captions: Mapping[K, str], tag: str, *, front: bool = False) -> dict[K, str]:
    """``tag`` added to every caption that lacks it, at the end (or the front)."""
    tag = _norm(tag)
    if not tag:
        return {}
    out = {}
    for k, text in captions.items():
        tags = [_norm(t) for t in split_tags(text)]
        if tag in tags:
            continue
        out[k] = _join([tag] + tags if front else tags + [tag])
    return out


def remove_tag(captions: Mapping[K, str], tag: str) -> dict[K, str]:
    tag = _norm(tag)
    out = {}
    for k, text in captions.items():
        tags = [_norm(t) for t in split_tags(text)]
        if tag in tags:
            out[k] = _join([t for t in tags if t != tag])
    return out


def replace_tag(captions: Mapping[K, str], old: str, new: str) -> dict[K, str]:
    """``old`` becomes ``new`` in place; where the caption already has ``new`` the old one is just removed."""
    old, new = _norm(old), _norm(new)
    if not new:
        return remove_tag(captions, old)
    out = {}
    for k, text in captions.items():
        tags = [_norm(t) for t in split_tags(text)]
        if old not in tags or old == new:
            continue
        result: list[str] = []
        for t in tags:
            t = new if t == old else t
            if t not in result:
                result.append(t)
        out[k] = _join(result)
    return _changed(captions, out)


def move_to_front(captions: Mapping[K, str], tag: str) -> dict[K, str]:
    """``tag`` moved to the first place where a caption holds it (kohya's keep_tokens keeps the first tags)."""
    tag = _norm(tag)
    out = {}
    for k, text in captions.items():
        tags = [_norm(t) for t in split_tags(text)]
        if tag in tags and tags[0] != tag:
            out[k] = _join([tag] + [t for t in tags if t != tag])
    return out


def insert_trigger(captions: Mapping[K, str], trigger: str) -> dict[K, str]:
    """The trigger word first in every caption that does not start with it or hold it already."""
    trigger = _norm(trigger)
    if not trigger:
        return {}
    out = {}
    for k, text in captions.items():
        if not has_trigger(text, trigger):
            out[k] = _join([trigger] + [_norm(t) for t in split_tags(text)])
    return out


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class Change:
    path: Path  # a caption file
    before: bytes | None  # its exact bytes before, None when it did not exist
    after: bytes


@dataclass
class Edit:
    """One bulk operation as written to disk: what undo puts back."""

    label: str
    changes: list[Change] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # files that could not be written, and why


def read_caption_file(path: Path) -> str:
    try:
        return decode_caption(Path(path).read_bytes()).text
    except FileNotFoundError:
        return ""


def write_edit(new_texts: Mapping[Path, str], label: str) -> Edit:
    """Write each caption file's new text atomically (UTF-8), keeping the exact old bytes for undo.

    A file that cannot be written is listed in ``failed`` and left as it was; the others are still written.
    """
    edit = Edit(label)
    for path, text in new_texts.items():
        path = Path(path)
        try:
            before = path.read_bytes() if path.exists() else None
        except OSError as exc:
            edit.failed.append((path, f"could not be read ({exc.strerror or exc})"))
            continue
        after = text.strip().encode("utf-8")
        if before == after:
            continue
        try:
            atomic_write_bytes(path, after)
        except OSError as exc:
            edit.failed.append((path, f"could not be written ({exc.strerror or exc})"))
            continue
        edit.changes.append(Change(path, before, after))
    return edit


@dataclass
class UndoResult:
    restored: list[Path]
    kept: list[tuple[Path, str]]  # files not restored, and why (changed since, or unwritable)


def undo_edit(edit: Edit) -> UndoResult:
    """Put back the exact bytes each file had before ``edit`` (removing files it created).

    A file changed again since (by hand or another tool) is left alone and reported: undo never destroys newer work.
    """
    result = UndoResult([], [])
    for change in reversed(edit.changes):
        try:
            now = change.path.read_bytes() if change.path.exists() else None
        except OSError as exc:
            result.kept.append((change.path, f"could not be read ({exc.strerror or exc})"))
            continue
        if now != change.after:
            result.kept.append((change.path, "changed since, so it was left as it is now"))
            continue
        try:
            if change.before is None:
                os.unlink(change.path)
            else:
                atomic_write_bytes(change.path, change.before)
        except OSError as exc:
            result.kept.append((change.path, f"could not be written ({exc.strerror or exc})"))
            continue
        result.restored.append(change.path)
    return result


class UndoJournal:
    """Bulk edits, newest last; ``undo`` reverts the newest. One journal per dataset folder."""

    def __init__(self, limit: int = 50) -> None:
        self._edits: list[Edit] = []
        self.limit = limit

    def push(self, edit: Edit) -> None:
        if edit.changes:
            self._edits.append(edit)
            del self._edits[: -self.limit]

    @property
    def can_undo(self) -> bool:
        return bool(self._edits)

    @property
    def next_label(self) -> str:
        return self._edits[-1].label if self._edits else ""

    def __len__(self) -> int:
        return len(self._edits)

    def undo(self) -> tuple[Edit, UndoResult] | None:
        if not self._edits:
            return None
        edit = self._edits.pop()
        return edit, undo_edit(edit)

    def clear(self) -> None:
        self._edits.clear()
