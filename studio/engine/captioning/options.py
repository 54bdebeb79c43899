"""Captioning options, declared once (default, help, range, choices) for the CLI flags, the GUI and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

from studio.engine.config import option

KINDS = ("tagger", "blip", "florence2")
KIND_LABELS = {"tagger": "WD14 tagger (booru tags)", "blip": "BLIP (short sentence)",
               "florence2": "Florence-2 (sentence or paragraph)"}
MODES = ("only-missing", "append", "replace")
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
CHARACTER_PLACES = ("first", "mixed", "omit")


@dataclass
class CaptionOptions:
    mode: str = option(
        "only-missing",
        "What happens to existing captions: 'only-missing' captions only images without one, 'append' adds the new "
        "text after the old, 'replace' writes the new text instead (the old text is backed up first).",
        label="Existing captions", choices=MODES)
    prefix: str = option(
        "", "Text put first in every new caption, e.g. your trigger word (not repeated if the caption has it).",
        label="Prefix (trigger word)")
    general_threshold: float = option(
        0.35, "Tagger: keep a general tag when the model is at least this sure of it (0-1; lower gives more tags).",
        label="General tag threshold", min=0.0, max=1.0)
    character_threshold: float = option(
        0.85, "Tagger: keep a character tag when the model is at least this sure of it (0-1).",
        label="Character tag threshold", min=0.0, max=1.0)
    characters: str = option(
        "first", "Tagger: where character tags go: 'first' before the general tags, 'mixed' in order of confidence, "
        "'omit' left out.", label="Character tags", choices=CHARACTER_PLACES)
    rating: bool = option(False, "Tagger: add the most likely rating tag (general, sensitive, questionable, explicit).",
                          label="Add rating tag", advanced=True)
    exclude_tags: str = option("", "Tagger: comma-separated tags never to write, e.g. 'simple background, white background'.",
                               label="Tags to exclude")
    underscores_to_spaces: bool = option(True, "Tagger: write 'long hair' instead of 'long_hair' (emoticons like ^_^ stay).",
                                         label="Underscores to spaces")
    max_tags: int = option(0, "Tagger: keep at most this many tags, most confident first (0 = no limit).",
                           label="Maximum tags", min=0, max=500)
    max_tokens: int = option(75, "BLIP and Florence-2: longest caption to generate, in tokens (about 3/4 of a word each).",
                             label="Maximum length", min=5, max=1024, unit="tokens")
    beams: int = option(3, "BLIP and Florence-2: beam search width; more is slower and usually a little better.",
                        label="Beams", min=1, max=8, advanced=True)
    florence_task: str = option("<CAPTION>", "Florence-2: how much to write: a caption, a detailed caption or a paragraph.",
                                label="Florence-2 task", choices=FLORENCE_TASKS)
    batch_size: int = option(4, "Images captioned together; larger is faster on a GPU and needs more memory.",
                             label="Batch size", min=1, max=64, advanced=True)


def option_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    for f in dataclasses.fields(CaptionOptions):
        yield f.name, f


def validate_options(options: CaptionOptions) -> list[str]:
    """Every problem at once, each naming the option and what to do."""
    problems = []
    for name, f in option_fields():
        value = getattr(options, name)
        meta: dict[str, Any] = f.metadata
        label = meta.get("label") or name
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(f"{label} ({name}) must be one of {', '.join(meta['choices'])}, not {value!r}")
        if meta.get("min") is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not meta["min"] <= value <= meta["max"]:
                problems.append(f"{label} ({name}) must be between {meta['min']:g} and {meta['max']:g}, not {value!r}")
    return problems
