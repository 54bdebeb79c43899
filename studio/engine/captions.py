"""Caption files: reading them whatever their encoding, and composing the text a training step sees."""

from __future__ import annotations

import codecs
import os
import random
from dataclasses import dataclass
from pathlib import Path

# A caption is read only this far. The text encoders see 77 tokens (kohya's longest setting: 225), a few hundred to
# ~1,500 characters; tokenizing costs ~11 s and ~330 MB per MB of text, so a 50 MB "caption" (a log or a dump
# saved as .txt) once took 13.9 GB while caching text embeddings.
MAX_CAPTION_CHARS = 4096
MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS + 4  # enough for MAX_CAPTION_CHARS in any encoding we read (UTF-8: 4 bytes)


@dataclass(frozen=True)
class CaptionText:
    """A caption file's text and how it was decoded."""

    text: str  # stripped; several lines are joined with ", "
    encoding: str  # "utf-8", "utf-16", "cp1252" or "latin-1"
    lines: int  # non-empty lines in the (read part of the) file
    truncated: bool = False  # the file holds more than MAX_CAPTION_CHARS / MAX_CAPTION_BYTES; only the start is used
    file_size: int | None = None  # bytes in the file, when read from one

    @property
    def fallback(self) -> bool:
        """True when the bytes were not valid UTF-8/UTF-16 and a legacy code page had to be guessed."""
        return self.encoding in ("cp1252", "latin-1")


def decode_caption(data: bytes, *, complete: bool = True) -> CaptionText:
    """Decode caption bytes: UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252, else Latin-1.

    ``complete=False`` says ``data`` is only the start of a file: a character cut in half at the end is dropped
    instead of making valid UTF-8 look like a legacy code page. Never raises: Latin-1 maps every byte.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Windows Notepad's "Unicode" saves UTF-16 with a BOM; as cp1252 it would read as NUL-riddled garbage.
        try:
            return _clean(_decode(data, "utf-16", complete), "utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return _clean(_decode(data, "utf-8-sig", complete), "utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return _clean(data.decode("cp1252"), "cp1252")
    except UnicodeDecodeError:
        # cp1252 leaves five bytes undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D); Latin-1 defines all 256.
        return _clean(data.decode("latin-1"), "latin-1")


def _decode(data: bytes, encoding: str, complete: bool) -> str:
    if complete:
        return data.decode(encoding)
    return codecs.getincrementaldecoder(encoding)().decode(data, final=False)  # keeps back a cut-off last character


def read_caption_file(path: Path | str) -> CaptionText:
    """A caption file's text, reading at most MAX_CAPTION_BYTES and keeping at most MAX_CAPTION_CHARS.

    ``truncated`` says when the file held more; the file itself is never changed. Raises OSError if unreadable.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(MAX_CAPTION_BYTES + 1)
    cut = len(data) > MAX_CAPTION_BYTES
    decoded = decode_caption(data[:MAX_CAPTION_BYTES], complete=not cut)
    text = decoded.text
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS]
        cut = True
    if cut:  # end at a tag or word boundary rather than inside a word
        boundary = max(text.rfind(","), text.rfind(" "))
        text = (text[:boundary] if boundary > MAX_CAPTION_CHARS // 2 else text).rstrip(" ,")
    return CaptionText(text, decoded.encoding, decoded.lines, cut, size)


def _clean(text: str, encoding: str) -> CaptionText:
    text = text.replace("\x00", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # kohya reads only the first line; tagging tools that write one tag per line lose all but one tag that way.
    # Joining with ", " keeps every tag and reads naturally for prose split over lines.
    return CaptionText(", ".join(lines), encoding, len(lines))


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def has_trigger(caption: str, trigger_word: str) -> bool:
    """Whether ``caption`` already names the trigger: as one of its tags, or as its first word."""
    trigger = trigger_word.strip()
    if not trigger:
        return True
    folded = trigger.casefold()
    tags = split_tags(caption)
    if any(t.casefold() == folded for t in tags):
        return True
    words = caption.strip().split()
    # "ohwx man, smiling": the trigger starts the first tag.
    n = len(trigger.split())
    return " ".join(words[:n]).rstrip(",").casefold() == folded


def compose_caption(
    caption: str,
    *,
    trigger_word: str = "",
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    dropout: float = 0.0,
    rng: random.Random | None = None,
) -> str:
    """The text one training step sees for ``caption``.

    - dropout: with probability ``dropout`` the result is "" (unconditional training, as in kohya).
    - trigger: prepended as the first tag unless the caption already has it as a tag or its first word;
      a missing/empty caption becomes the trigger word alone.
    - shuffle_tags: comma-separated tags are shuffled, except the first ``keep_tokens`` tags. The trigger
      is always kept and counts toward ``keep_tokens`` (kohya users write the trigger first and set
      keep_tokens=1; prepending it for them must give the same result).
    Without shuffling the caption text is kept exactly as written (prose keeps its commas and spacing).
    """
    if dropout > 0:
        rng = rng or random.Random()
        if dropout >= 1 or rng.random() < dropout:
            return ""
    caption = caption.strip()
    trigger = trigger_word.strip()
    present = has_trigger(caption, trigger)

    if not shuffle_tags:
        if not trigger or present:
            return caption
        return f"{trigger}, {caption}" if caption else trigger

    tags = split_tags(caption)
    keep = max(0, keep_tokens)
    if trigger:
        folded = trigger.casefold()
        at = next((i for i, t in enumerate(tags) if t.casefold() == folded), None)
        if at is not None:
            tags.insert(0, tags.pop(at))  # a trigger tag further back moves to the front, where it is kept
        elif not present:
            tags.insert(0, trigger)
        keep = max(keep, 1)
    head, tail = tags[:keep], tags[keep:]
    rng = rng or random.Random()
    rng.shuffle(tail)
    return ", ".join(head + tail)


def short(text: str, limit: int = 60) -> str:
    """A caption cut for messages: 'a red circle on a…'."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
