"""Caption a dataset: ``run_captioning(request, stop)`` proposes captions as events; ``write_captions`` writes them."""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

from studio.engine.captioning.base import CaptionModelError, Captioner
from studio.engine.captioning.bulk_edit import Change, Edit
from studio.engine.captioning.events import (
    CaptionEvent, CaptioningCancelled, CaptioningFailed, CaptioningFinished, CaptioningStarted, CaptionProposed,
    CaptionSkipped, CaptionStatus, Proposal,
)
from studio.engine.captioning.options import CaptionOptions, validate_options
from studio.engine.captions import decode_caption, has_trigger, split_tags
from studio.engine.fileio import atomic_write_bytes

BACKUP_FOLDER = ".lora-studio/caption-backups"  # inside the dataset; the scan skips folders starting with "."


@dataclass
class CaptionRequest:
    dataset: Path
    model: str  # a hub id in the local cache, or a folder (or a model file in one)
    kind: str | None = None  # "tagger" | "blip" | "florence2"; None: whatever the folder holds
    options: CaptionOptions = field(default_factory=CaptionOptions)
    caption_extension: str = ".txt"
    device: str = "auto"  # "auto" | "cpu" | "cuda"


def compose_proposal(current: str, generated: str, options: CaptionOptions) -> str:
    """The caption to write, from the current one and what the model said, per the mode and prefix."""
    generated = " ".join(generated.split())
    current = current.strip()
    prefix = options.prefix.strip()
    if options.mode == "append" and current:
        tags = split_tags(current)
        seen = {" ".join(t.split()).casefold() for t in tags}
        extra = [t for t in split_tags(generated) if " ".join(t.split()).casefold() not in seen]
        if prefix and not has_trigger(current, prefix):
            tags.insert(0, prefix)
        return ", ".join(tags + extra)
    if prefix and not has_trigger(generated, prefix):
        return f"{prefix}, {generated}" if generated else prefix
    return generated


def run_captioning(request: CaptionRequest, stop: threading.Event | None = None,
                   captioner: Captioner | None = None) -> Iterator[CaptionEvent]:
    """Propose a caption for each image of the dataset; nothing is written. Exactly one terminal event ends it.

    ``captioner``: an already loaded one (the GUI keeps its model between runs); else ``request.model`` is loaded.
    """
    stop = stop or threading.Event()
    started = time.monotonic()
    problems = validate_options(request.options)
    if problems:
        yield CaptioningFailed("Some caption options are not valid: " + "; ".join(problems) + ".")
        return
    try:
        yield CaptionStatus("Checking images", str(request.dataset))
        from studio.engine.dataset import DatasetError, ScanCancelled, caption_path_for, scan_dataset

        try:
            report = scan_dataset(request.dataset, caption_extension=request.caption_extension, stop=stop)
        except ScanCancelled:
            yield CaptioningCancelled(0)
            return
        except DatasetError as exc:
            yield CaptioningFailed(str(exc))
            return
        options = request.options
        skipped = 0
        for issue in report.issues:  # images the doctor already knows cannot be used
            if issue.severity == "error" and issue.file != "." and issue.action.startswith("skipped"):
                skipped += 1
                yield CaptionSkipped(issue.file, f"{issue.problem}; not captioned")
        todo = []
        for item in report.items:
            rel = item.image_path.relative_to(report.root).as_posix()
            if options.mode == "only-missing" and item.caption:
                skipped += 1
                yield CaptionSkipped(rel, "has a caption already (only missing captions are made)", "info")
                continue
            todo.append((item, rel))
        if not todo:
            yield CaptioningFinished(0, skipped, time.monotonic() - started, 0.0)
            return

        if captioner is None:
            yield CaptionStatus("Loading model", request.model)
            from studio.engine.captioning.models import load_captioner

            t0 = time.monotonic()
            try:
                captioner = load_captioner(request.model, request.kind, request.device)
            except CaptionModelError as exc:
                yield CaptioningFailed(str(exc))
                return
            load_s = time.monotonic() - t0
        else:
            load_s = 0.0
        if stop.is_set():
            yield CaptioningCancelled(0)
            return
        yield CaptioningStarted(len(todo), request.model, captioner.kind, captioner.describe(), load_s)
        yield CaptionStatus("Captioning", f"{len(todo)} images")

        from studio.engine.images import load_image

        done = 0
        model_s = 0.0
        size = max(1, options.batch_size)
        for start in range(0, len(todo), size):
            if stop.is_set():
                yield CaptioningCancelled(done)
                return
            batch, images = [], []
            for item, rel in todo[start:start + size]:
                try:
                    images.append(load_image(item.image_path))
                    batch.append((item, rel))
                except Exception as exc:  # changed or damaged since the scan
                    skipped += 1
                    yield CaptionSkipped(rel, f"could not be decoded ({exc}); not captioned")
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                outputs = [(b, o) for b, o in zip(batch, captioner.caption(images, options))]
            except CaptionModelError as exc:
                yield CaptioningFailed(str(exc))
                return
            except Exception:  # one bad image must not cost the others: find it by trying them one at a time
                outputs = []
                for b, image in zip(batch, images):
                    try:
                        outputs.append((b, captioner.caption([image], options)[0]))
                    except Exception as exc:
                        skipped += 1
                        yield CaptionSkipped(b[1], f"the model failed on it ({type(exc).__name__}: {exc}); not captioned")
            per_image = (time.monotonic() - t0) / max(1, len(batch))
            model_s += per_image * len(batch)
            for (item, rel), output in outputs:
                done += 1
                proposal = Proposal(
                    image_path=item.image_path, rel=rel,
                    caption_path=caption_path_for(item.image_path, request.caption_extension),
                    current=item.caption, proposed=compose_proposal(item.caption, output.text, options),
                    exists=item.caption_source != "missing")
                yield CaptionProposed(done, len(todo), proposal, per_image)
        yield CaptioningFinished(done, skipped, time.monotonic() - started, model_s / done if done else 0.0)
    except Exception as exc:  # the consumer must always get a terminal event
        yield CaptioningFailed(f"Captioning stopped because of an unexpected error: {exc}",
                               "".join(traceback.format_exception(exc)))


# ------------------------------------------------------------------------------------------------ write


class OverwriteNotConfirmed(Exception):
    """Writing would change captions that have text, and the caller did not confirm it (nothing was written)."""

    def __init__(self, files: list[Path]):
        self.files = files
        names = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        super().__init__(f"{len(files)} existing caption(s) would be changed ({names}); confirm to write them "
                         "(the old text is backed up first)")


@dataclass
class WriteResult:
    edit: Edit  # what was written; undo puts it back
    unchanged: int
    backup_dir: Path | None  # where the old text of changed captions was copied

    @property
    def written(self) -> list[Path]:
        return [c.path for c in self.edit.changes]


def write_captions(dataset: Path, proposals: list[Proposal], *, confirm_overwrite: bool = False,
                   label: str = "Write captions", now: datetime | None = None) -> WriteResult:
    """Write accepted proposals, each atomically; captions with text are backed up first and need confirmation.

    Backups go to ``<dataset>/.lora-studio/caption-backups/<time>/<same relative path>``, which the dataset scan
    ignores. If a backup cannot be made, nothing is written.
    """
    dataset = Path(dataset)
    plan: list[tuple[Proposal, bytes | None, bytes]] = []
    unchanged = 0
    for p in proposals:
        path = p.caption_path
        before = path.read_bytes() if path.exists() else None
        after = p.proposed.strip().encode("utf-8")
        if before == after:
            unchanged += 1
            continue
        plan.append((p, before, after))
    overwrite = [p.caption_path for p, before, _ in plan if before is not None and decode_caption(before).text]
    if overwrite and not confirm_overwrite:
        raise OverwriteNotConfirmed(overwrite)
    backup_dir = None
    if overwrite:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        backup_dir = _free(dataset / BACKUP_FOLDER / stamp)
        for p, before, _ in plan:
            if before is not None:
                rel = p.caption_path.relative_to(dataset) if p.caption_path.is_relative_to(dataset) else p.caption_path.name
                atomic_write_bytes(backup_dir / rel, before)  # raises: then nothing has been overwritten yet
    edit = Edit(label)
    for p, before, after in plan:
        try:
            atomic_write_bytes(p.caption_path, after)
        except OSError as exc:
            edit.failed.append((p.caption_path, f"could not be written ({exc.strerror or exc})"))
            continue
        edit.changes.append(Change(p.caption_path, before, after))
    return WriteResult(edit, unchanged, backup_dir)


def _free(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``… when a backup of the same second exists."""
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate
