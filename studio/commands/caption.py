"""`lora-studio caption DIR --model M`: propose captions with a tagger or captioner, show them, write them safely."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from studio.engine.captioning.options import KIND_LABELS, KINDS, CaptionOptions, option_fields

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "caption", help="caption a dataset with a WD14 tagger, BLIP or Florence-2",
        description="Propose a caption for each image of DIR with a local model, print the proposals, then write "
                    "them to the .txt caption files. Existing captions are changed only with --yes (or a yes at "
                    "the prompt) and their old text is copied to DIR/.lora-studio/caption-backups/ first. "
                    "Models are read from the Hugging Face cache or a folder; a model that is not there is "
                    "downloaded only with --download (or a yes at the prompt), after showing its size.")
    p.add_argument("dir", nargs="?", help="the dataset folder")
    p.add_argument("--model", default="", help="hub id (e.g. SmilingWolf/wd-vit-tagger-v3) or model folder")
    p.add_argument("--kind", choices=KINDS, default=None, help="what the model must be (default: whatever it is)")
    p.add_argument("--list-models", action="store_true", help="list the models found here and those on offer, then exit")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs (default auto)")
    p.add_argument("--dry-run", action="store_true", help="print the proposals and write nothing")
    p.add_argument("--yes", action="store_true", help="agree to changing existing captions (their old text is backed up)")
    p.add_argument("--download", action="store_true", help="agree to downloading the model if it is not on this computer")
    p.add_argument("--quiet", action="store_true", help="print only the summary and problems")
    group = p.add_argument_group("caption options")
    defaults = CaptionOptions()
    for name, f in option_fields():
        meta = f.metadata
        flag = "--" + name.replace("_", "-")
        kw: dict = {"dest": f"opt_{name}", "default": getattr(defaults, name), "help": meta["help"] + " (default %(default)s)"}
        if isinstance(kw["default"], bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(kw["default"])
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        group.add_argument(flag, **kw)
    return p


def _options(args: argparse.Namespace) -> CaptionOptions:
    return CaptionOptions(**{name: getattr(args, f"opt_{name}") for name, _ in option_fields()})


def _ask(question: str) -> bool:
    if not sys.stdin or not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def run(args: argparse.Namespace, ask: Callable[[str], bool] | None = None) -> int:
    ask = ask or _ask
    if args.list_models:
        return _list_models()
    if not args.dir or not args.model:
        print("error: give the dataset folder and --model (see --list-models for what is available)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from studio.engine.captioning import (
        CaptioningCancelled, CaptioningFailed, CaptioningFinished, CaptioningStarted, CaptionModelError,
        CaptionProposed, CaptionRequest, CaptionSkipped, CaptionStatus, OverwriteNotConfirmed, run_captioning,
        validate_options, write_captions,
    )

    options = _options(args)
    problems = validate_options(options)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model = args.model
    try:
        model = _ensure_model(model, args.download, ask)
    except CaptionModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if model is None:
        return EXIT_BAD_INPUT
    stop = threading.Event()
    _stop_on_interrupt(stop)
    request = CaptionRequest(Path(args.dir).expanduser(), model, args.kind, options, args.caption_extension, args.device)
    proposals = []
    skipped = 0
    cancelled = False
    for event in run_captioning(request, stop):
        match event:
            case CaptionStatus(phase=phase):
                if not args.quiet:
                    print(f"{phase}…", file=sys.stderr)
            case CaptioningStarted(total=total, description=description, load_s=load_s):
                if not args.quiet:
                    print(f"{description}, loaded in {load_s:.1f} s; captioning {total} image(s)", file=sys.stderr)
            case CaptionProposed(index=i, total=total, proposal=p):
                proposals.append(p)
                if not args.quiet:
                    was = f"\n    was: {p.current}" if p.overwrites else ""
                    print(f"[{i}/{total}] {p.rel}: {p.proposed}{was}")
            case CaptionSkipped(rel=rel, reason=reason, severity=severity):
                skipped += 1
                if severity == "warning" or not args.quiet:
                    print(f"{'warning' if severity == 'warning' else 'note'}: {rel}: {reason}", file=sys.stderr)
            case CaptioningFinished(proposed=n, seconds_per_image=spi):
                if not args.quiet:
                    print(f"{n} caption(s) proposed, {skipped} image(s) skipped, {spi * 1000:.1f} ms per image",
                          file=sys.stderr)
            case CaptioningFailed(message=message):
                print(f"error: {message}", file=sys.stderr)
                return EXIT_FAILED
            case CaptioningCancelled(proposed=n):
                cancelled = True
                print(f"stopped after {n} image(s); nothing is written", file=sys.stderr)
            case _:
                print(f"note: unknown event {event!r}", file=sys.stderr)
    if cancelled:
        return EXIT_CANCELLED
    if args.dry_run or not proposals:
        if args.dry_run:
            print("dry run: nothing written", file=sys.stderr)
        return EXIT_OK
    confirmed = args.yes
    changing = [p for p in proposals if p.overwrites]
    if changing and not confirmed:
        confirmed = ask(f"Change {len(changing)} existing caption(s)? Their old text is backed up first.")
        if not confirmed:
            print(f"error: {len(changing)} existing caption(s) would change; nothing written. Pass --yes to agree "
                  "(old text is backed up), or --mode only-missing to leave them alone.", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        result = write_captions(request.dataset, proposals, confirm_overwrite=confirmed)
    except OverwriteNotConfirmed as exc:  # a caption changed on disk while we ran
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: backup failed, nothing written: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for path, why in result.edit.failed:
        print(f"error: {path}: {why}", file=sys.stderr)
    backup = f"; old text of changed captions in {result.backup_dir}" if result.backup_dir else ""
    print(f"Wrote {len(result.written)} caption file(s), {result.unchanged} unchanged{backup}")
    return EXIT_FAILED if result.edit.failed else EXIT_OK


def _ensure_model(model: str, allowed: bool, ask: Callable[[str], bool]) -> str | None:
    """The model to use; a catalog model missing here is downloaded after consent (None: the user declined)."""
    from studio.engine.captioning.hub import download, download_offer
    from studio.engine.captioning.models import resolve, spec_for
    from studio.engine.captioning.base import CaptionModelError

    try:
        resolve(model)
        return model
    except CaptionModelError:
        if spec_for(model) is None:
            raise
    offer = download_offer(model)
    question = f"{offer.describe()} is not on this computer. Download it from the Hugging Face hub?"
    if not allowed and not ask(question):
        print(f"error: {offer.describe()} is not on this computer; pass --download to download it", file=sys.stderr)
        return None
    print(f"Downloading {offer.describe()}…", file=sys.stderr)
    folder = download(offer, consent=True, progress=_print_progress())
    print(f"\nDownloaded to {folder}", file=sys.stderr)
    return model


def _print_progress() -> Callable[[int, int], None]:
    from studio.engine.captioning.hub import format_bytes

    def show(done: int, total: int) -> None:
        print(f"\r  {format_bytes(done)} / {format_bytes(total)}", end="", file=sys.stderr, flush=True)

    return show


def _list_models() -> int:
    from studio.engine.captioning.hub import download_offer, format_bytes
    from studio.engine.captioning.models import CATALOG, find_offline

    found = find_offline()
    have = {m.ref for m in found}
    print("On this computer:")
    for m in found:
        print(f"  {m.ref}  ({KIND_LABELS[m.kind]}, {format_bytes(m.size_bytes)})  {m.path}")
    if not found:
        print("  none found in the Hugging Face cache")
    print("Can be downloaded (with --download):")
    for spec in CATALOG:
        if spec.id in have:
            continue
        offer = download_offer(spec.id)
        print(f"  {spec.id}  ({KIND_LABELS[spec.kind]}, {'about ' if not offer.exact else ''}"
              f"{format_bytes(offer.total_bytes)}): {spec.note}")
    return EXIT_OK


def _stop_on_interrupt(stop: threading.Event) -> None:
    """First Ctrl+C stops after the current batch (nothing is written); a second one exits at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
