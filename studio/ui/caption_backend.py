"""The captioning calls the window makes (run in background tasks), imported late like studio.ui.backend's."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from studio.ui.backend import _IMPORT_LOCK


class _EitherStop:
    """Set when the user cancels or the window shuts down: the engine only asks ``is_set()``."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def caption_dataset(request: Any, user_stop: threading.Event, progress: Callable[[Any], None],
                    stop: threading.Event | None = None) -> None:
    """Run the captioning and pass every event to ``progress`` (a signal): the dialog has one dispatch for them."""
    with _IMPORT_LOCK:
        from studio.engine.captioning import run_captioning
    for event in run_captioning(request, _EitherStop(user_stop, *(e for e in (stop,) if e is not None))):  # type: ignore[arg-type]
        progress(event)


def find_caption_models(folders: list[Path]) -> list[Any]:
    with _IMPORT_LOCK:
        from studio.engine.captioning.models import find_offline
    return find_offline(folders)


def identify_folder(folder: Path) -> str | None:
    from studio.engine.captioning.models import identify

    return identify(folder)


def download_offer(model_id: str) -> Any:
    from studio.engine.captioning.hub import download_offer as offer

    return offer(model_id)


def download_model(offer: Any, progress: Callable[[Any], None], stop: threading.Event | None = None) -> Path:
    """Only ever called after the user agreed to ``offer`` in the confirmation dialog."""
    from studio.engine.captioning.hub import download

    return download(offer, consent=True, progress=lambda done, total: progress((done, total)), stop=stop)


def write_captions(dataset: Path, proposals: list, confirm_overwrite: bool) -> Any:
    from studio.engine.captioning import write_captions as write

    return write(dataset, proposals, confirm_overwrite=confirm_overwrite)


def write_edit(new_texts: Mapping[Path, str], label: str) -> Any:
    from studio.engine.captioning.bulk_edit import write_edit as write

    return write(new_texts, label)


def undo(journal: Any) -> Any:
    return journal.undo()
