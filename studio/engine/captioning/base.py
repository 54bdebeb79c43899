"""What every captioner offers (load, caption, describe) and the errors a model can cause."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from studio.engine.captioning.options import CaptionOptions


class CaptionModelError(ValueError):
    """A captioning model cannot be used: missing, damaged, of another kind. The message says what to do."""


@dataclass(frozen=True)
class TagScore:
    name: str  # as in the tag list (underscores kept)
    score: float  # 0..1
    category: str  # "general" | "character" | "rating"


@dataclass(frozen=True)
class CaptionOutput:
    """What a model said about one image: the text to propose, and for taggers every tag above its threshold."""

    text: str
    tags: tuple[TagScore, ...] = field(default=(), compare=False)


class Captioner(Protocol):
    """One kind of captioning model. ``load`` once, then ``caption`` batches of RGB images."""

    kind: str

    def load(self, folder: Path, device: str = "cpu") -> None:
        """Read the model from ``folder``; raises CaptionModelError with a sentence for people."""

    def caption(self, images: list[Any], options: CaptionOptions) -> list[CaptionOutput]:
        """One output per PIL image, in order."""

    def describe(self) -> str:
        """E.g. 'WD14 tagger, 10,861 tags, 448 px (onnxruntime, CPU)'."""
