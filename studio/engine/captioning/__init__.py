"""Captioning a dataset: taggers and captioners proposing captions, writing them safely, and bulk tag editing."""

from studio.engine.captioning.base import CaptionModelError, CaptionOutput, Captioner, TagScore
from studio.engine.captioning.events import (
    TERMINAL, CaptionEvent, CaptioningCancelled, CaptioningFailed, CaptioningFinished, CaptioningStarted,
    CaptionProposed, CaptionSkipped, CaptionStatus, Proposal,
)
from studio.engine.captioning.options import KINDS, KIND_LABELS, MODES, CaptionOptions, validate_options
from studio.engine.captioning.run import (
    BACKUP_FOLDER, CaptionRequest, OverwriteNotConfirmed, WriteResult, compose_proposal, run_captioning,
    write_captions,
)

__all__ = [
    "CaptionModelError", "CaptionOutput", "Captioner", "TagScore", "TERMINAL", "CaptionEvent", "CaptioningCancelled",
    "CaptioningFailed", "CaptioningFinished", "CaptioningStarted", "CaptionProposed", "CaptionSkipped",
    "CaptionStatus", "Proposal", "KINDS", "KIND_LABELS", "MODES", "CaptionOptions", "validate_options",
    "BACKUP_FOLDER", "CaptionRequest", "OverwriteNotConfirmed", "WriteResult", "compose_proposal",
    "run_captioning", "write_captions",
]
