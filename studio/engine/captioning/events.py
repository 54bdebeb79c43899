"""The closed set of events a captioning run emits; the GUI, the CLI and the tests match on these types."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class CaptionStatus:
    """A phase began: 'Checking images', 'Loading model', 'Captioning'."""

    phase: str
    message: str = ""


@dataclass(frozen=True)
class CaptioningStarted:
    total: int  # images that will be captioned
    model: str  # what the request named
    kind: str
    description: str  # the captioner's describe()
    load_s: float


@dataclass(frozen=True)
class Proposal:
    """A new caption for one image, not yet written."""

    image_path: Path
    rel: str  # path relative to the dataset, "/"-separated
    caption_path: Path  # the file it would be written to
    current: str  # the caption as it is now ("" when none)
    proposed: str  # what would be written
    exists: bool  # the caption file exists now

    @property
    def overwrites(self) -> bool:
        """Writing it would change a caption that has text."""
        return bool(self.current.strip()) and self.proposed.strip() != self.current.strip()


@dataclass(frozen=True)
class CaptionProposed:
    index: int  # 1-based, over the images being captioned
    total: int
    proposal: Proposal
    seconds: float  # model time for this image (its batch's time divided by the batch size)


@dataclass(frozen=True)
class CaptionSkipped:
    """An image that gets no proposal, and why (a sentence): it cannot be decoded, the model failed on it, or it
    already has a caption and only missing ones are wanted."""

    rel: str
    reason: str
    severity: str = "warning"  # "warning" (look at it) | "info" (as asked)


@dataclass(frozen=True)
class CaptioningFinished:
    proposed: int
    skipped: int
    elapsed_s: float
    seconds_per_image: float


@dataclass(frozen=True)
class CaptioningFailed:
    message: str  # what happened and what to do
    details: str = ""


@dataclass(frozen=True)
class CaptioningCancelled:
    proposed: int  # proposals made before the stop; they are kept for the preview


CaptionEvent = Union[CaptionStatus, CaptioningStarted, CaptionProposed, CaptionSkipped, CaptioningFinished,
                     CaptioningFailed, CaptioningCancelled]
TERMINAL = (CaptioningFinished, CaptioningFailed, CaptioningCancelled)
