"""Scan a folder of images into a DatasetReport (usable items, and every problem with what happens to it)."""

from __future__ import annotations

import os
import re
import stat as stat_mod
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.engine.buckets import assign_bucket, bucket_sizes, plan_buckets, prepare_image
from studio.engine.captions import compose_caption, read_caption_file, short, split_tags
from studio.engine import images as _images
from studio.engine.fileio import atomic_write_bytes
from studio.engine.images import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    DatasetImageError,
    Probe,
    load_image,
    probe_image,
    set_max_image_pixels,
    to_rgb,
)

__all__ = [
    "DatasetItem", "DatasetIssue", "DatasetReport", "DatasetError", "DatasetImageError", "ScanCancelled",
    "scan_dataset", "load_image", "to_rgb", "compose_caption", "bucket_sizes", "assign_bucket", "prepare_image",
    "plan_buckets", "save_caption", "caption_path_for", "folder_repeats", "IMAGE_EXTENSIONS",
    "set_max_image_pixels", "clear_scan_cache",
]

MAX_REPEATS = 1000  # the job's default_repeats range; a bigger folder number is a date or an id, not repeats
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Folders that tools create and nobody means as training data.
_IGNORED_FOLDERS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information", "__pycache__"}
_MAX_DEPTH = 32


@dataclass(frozen=True)
class DatasetItem:
    image_path: Path
    caption: str  # caption text as read (stripped), "" if none; trigger NOT applied
    caption_source: str  # "file" | "missing" | "empty" | "fallback-encoding"
    folder: str  # sub-folder relative to root, "/"-separated ("" for root)
    repeats: int
    width: int  # after EXIF orientation
    height: int
    sha256: str  # of the file's bytes (duplicate detection, cache keys)
    mtime_ns: int
    size: int
    caption_truncated: bool = False  # the caption file is longer than a caption can be: only its start is used


@dataclass(frozen=True)
class DatasetIssue:
    file: str  # path relative to root, "/"-separated; "." for the folder as a whole
    problem: str  # what is wrong, a sentence
    severity: str  # "error" (skipped) | "warning" (used, but look at it) | "info"
    action: str  # what happens to it

    def __str__(self) -> str:
        return f"{self.file}: {self.problem} → {self.action}"


@dataclass
class DatasetReport:
    root: Path
    items: list[DatasetItem]
    issues: list[DatasetIssue]
    ignored: int  # non-image files and hidden files/folders, passed over silently
    trigger_word: str = ""

    @property
    def usable(self) -> int:
        return len(self.items)

    @property
    def images_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def by_severity(self, severity: str) -> list[DatasetIssue]:
        return [i for i in self.issues if i.severity == severity]

    @property
    def skipped(self) -> int:
        """Image files that are not used (errors and duplicates)."""
        return len({i.file for i in self.issues if i.action.startswith("skipped") and i.file != "."})

    def summary(self) -> str:
        """One line for people: '12 images usable (36 per epoch), 2 skipped, 3 warnings'."""
        parts = [f"{self.usable} image{'s' if self.usable != 1 else ''} usable ({self.images_per_epoch} per epoch)"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        warnings = len(self.by_severity("warning"))
        if warnings:
            parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
        return ", ".join(parts)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder ("10_name"), how many images carry each tag.

        Counted on the captions as trained (trigger applied, no shuffling), so the trigger shows up in the
        tag list A1111 displays.
        """
        out: dict[str, dict[str, int]] = {}
        for item in self.items:
            key = _kohya_folder_key(item.folder, item.repeats, self.root.name)
            counts = out.setdefault(key, {})
            text = compose_caption(item.caption, trigger_word=self.trigger_word)
            for tag in dict.fromkeys(split_tags(text)):  # a tag twice in one caption counts once
                counts[tag] = counts.get(tag, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        root = self.root
        return {
            "root": str(root),
            "usable": self.usable,
            "images_per_epoch": self.images_per_epoch,
            "ignored": self.ignored,
            "images": [
                {
                    "file": _rel(item.image_path, root),
                    "folder": item.folder,
                    "caption": item.caption,
                    "caption_source": item.caption_source,
                    "repeats": item.repeats,
                    "width": item.width,
                    "height": item.height,
                    "sha256": item.sha256,
                    "size": item.size,
                    "mtime_ns": item.mtime_ns,
                }
                for item in self.items
            ],
            "problems": [
                {"file": i.file, "problem": i.problem, "severity": i.severity, "action": i.action} for i in self.issues
            ],
            "tag_frequency": self.tag_frequency(),
        }


class DatasetError(ValueError):
    """The dataset path itself is unusable (missing, not a folder, unreadable)."""


class ScanCancelled(Exception):
    """``stop`` was set while scanning; no report is produced (a partial one could be mistaken for the whole)."""


# ------------------------------------------------------------------------------------------------ repeats


def folder_repeats(
    folder: str, repeats: dict[str, int] | None = None, default_repeats: int = 1
) -> tuple[int, str | None]:
    """Repeats for images in ``folder`` (relative, "/"-separated) and, if any, a warning about the choice.

    The ``repeats`` dict wins (keyed by relative path or by folder name, innermost folder first); then a
    kohya-style name like ``10_faces`` on the folder or an enclosing sub-folder; then ``default_repeats``.
    The dataset root's own name never counts: people pick a folder, they do not name it for us.
    """
    repeats = repeats or {}
    parts = [p for p in folder.split("/") if p]
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))][::-1]
    if not parts:
        for key in ("", "."):  # the dataset root itself
            if key in repeats:
                return _checked_repeats(repeats[key], key, default_repeats)
    for prefix in prefixes:
        for key in (prefix, prefix.rsplit("/", 1)[-1]):
            if key in repeats:
                return _checked_repeats(repeats[key], key, default_repeats)
    for prefix in prefixes:
        match = _KOHYA_FOLDER.match(prefix.rsplit("/", 1)[-1])
        if match:
            n = int(match.group(1))
            if 1 <= n <= MAX_REPEATS:
                return n, None
            return default_repeats, (
                f"Folder name starts with {n}, which does not look like a repeat count (1–{MAX_REPEATS}); "
                f"using {default_repeats}"
            )
    return default_repeats, None


def _checked_repeats(value: Any, key: str, default: int) -> tuple[int, str | None]:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEATS:
        return default, f"Repeats for '{key}' must be a whole number from 1 to {MAX_REPEATS}, got {value!r}; using {default}"
    return value, None


def _kohya_folder_key(folder: str, repeats: int, root_name: str) -> str:
    # Folders already named kohya's way keep their name; others get the "<repeats>_" prefix kohya would show.
    if any(_KOHYA_FOLDER.match(part) for part in folder.split("/")):
        return folder
    return f"{repeats}_{folder or root_name or 'images'}"


# ------------------------------------------------------------------------------------------------ captions


def caption_path_for(image_path: Path | str, caption_extension: str = ".txt") -> Path:
    """The caption file of an image: same name with ``caption_extension``; an existing file that differs only
    in letter case (``a.TXT`` for ``a.png``) is used on case-sensitive file systems too."""
    image_path = Path(image_path)
    exact = image_path.with_suffix(caption_extension)
    if exact.is_file():
        return exact
    wanted = exact.name.casefold()
    try:
        with os.scandir(image_path.parent) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name.casefold() == wanted and entry.is_file():
                    return Path(entry.path)
    except OSError:
        pass
    return exact


def save_caption(image_path: Path | str, text: str, caption_extension: str = ".txt") -> Path:
    """Write an image's caption atomically as UTF-8 (the GUI's in-place editing); returns the caption path.

    An existing caption file keeps its name and permissions.
    """
    target = caption_path_for(image_path, caption_extension)
    atomic_write_bytes(target, text.strip().encode("utf-8"))  # keeps an existing file's permissions
    return target


# ---------------------------------------------------------------------------------------------------- walk


@dataclass
class _Candidate:
    rel: str
    path: Path
    folder: str
    st: os.stat_result
    caption: Path | None  # existing caption file, if any
    caption_name: str  # the expected caption file name, for messages


@dataclass
class _Walk:
    candidates: list[_Candidate] = field(default_factory=list)
    issues: list[DatasetIssue] = field(default_factory=list)
    ignored: int = 0
    folders: set[str] = field(default_factory=set)  # relative paths of every folder walked


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t.casefold() for t in re.split(r"(\d+)", name)) + (name,)


def _path_key(rel: str) -> tuple:
    return tuple(_natural(p) for p in rel.split("/"))


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _dir_key(path: str) -> tuple:
    st = os.stat(path)
    if st.st_ino:
        return (st.st_dev, st.st_ino)
    return ("real", os.path.realpath(path))  # file systems without inode numbers


def _walk(root: Path, caption_extension: str) -> _Walk:
    out = _Walk()
    visited: dict[tuple, str] = {_dir_key(str(root)): "."}
    # Real folders first, linked ones after: the same folder reached both ways is then scanned under its
    # real name, and the link is what gets reported.
    stack: list[tuple[str, int]] = [("", 0)]
    linked: list[tuple[str, int]] = []
    while stack or linked:
        folder, depth = stack.pop() if stack else linked.pop()
        out.folders.add(folder)
        dir_path = root / folder if folder else root
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=lambda e: _natural(e.name))
        except OSError as exc:
            out.issues.append(DatasetIssue(folder or ".", f"Folder could not be opened ({exc.strerror or exc})",
                                           "error", "skipped with everything in it"))
            continue
        by_name = {e.name: e for e in entries}
        by_fold = {}
        for e in entries:
            by_fold.setdefault(e.name.casefold(), e)
        used_captions: set[str] = set()
        others: list[str] = []
        subdirs: list[tuple[str, bool]] = []
        for entry in entries:
            name = entry.name
            rel = f"{folder}/{name}" if folder else name
            if name.startswith(".") or name in _IGNORED_FOLDERS:
                out.ignored += 1
                continue
            try:
                is_dir = entry.is_dir()  # follows links; a dangling link is neither dir nor file
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((rel, entry.is_symlink()))
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                try:
                    st = entry.stat()
                except OSError:
                    link = entry.is_symlink()
                    out.issues.append(DatasetIssue(rel, "Link to a file that does not exist" if link else
                                                   "Could not be read", "error", "skipped"))
                    continue
                if not stat_mod.S_ISREG(st.st_mode):
                    out.issues.append(DatasetIssue(rel, "Not a regular file", "error", "skipped"))
                    continue
                cap_name = os.path.splitext(name)[0] + caption_extension
                cap_entry = by_name.get(cap_name) or by_fold.get(cap_name.casefold()) if caption_extension else None
                caption = None
                if cap_entry is not None and cap_entry.name != name:
                    try:
                        if cap_entry.is_file():
                            caption = Path(cap_entry.path)
                            used_captions.add(cap_entry.name)
                    except OSError:
                        pass
                out.candidates.append(_Candidate(rel, Path(entry.path), folder, st, caption, cap_name))
            elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
                kind = UNSUPPORTED_IMAGE_EXTENSIONS[ext]
                out.issues.append(DatasetIssue(rel, f"{kind} file, which LoRA Studio does not read", "error",
                                               "skipped; save it as PNG or JPEG to use it"))
            else:
                others.append(name)
        out.ignored += sum(1 for name in others if name not in used_captions)
        for rel, is_link in reversed(subdirs):  # reversed: the stacks pop them in sorted order
            path = str(root / rel)
            try:
                key = _dir_key(path)
            except OSError as exc:
                out.issues.append(DatasetIssue(rel, f"Folder could not be opened ({exc.strerror or exc})",
                                               "error", "skipped with everything in it"))
                continue
            if key in visited:
                problem = (f"Link to a folder that is already scanned ('{visited[key]}')" if is_link
                           else f"Same folder as '{visited[key]}', which is already scanned")
                out.issues.append(DatasetIssue(rel, problem, "info", "not scanned twice"))
                continue
            if depth + 1 > _MAX_DEPTH:
                out.issues.append(DatasetIssue(rel, f"Nested more than {_MAX_DEPTH} folders deep", "warning",
                                               "skipped with everything in it"))
                continue
            visited[key] = rel
            (linked if is_link else stack).append((rel, depth + 1))
    out.candidates.sort(key=lambda c: _path_key(c.rel))
    return out


# ---------------------------------------------------------------------------------------------------- scan

_CACHE_LOCK = threading.Lock()
_PROBE_CACHE: dict[tuple, Probe] = {}
_CACHE_LIMIT = 50_000


def clear_scan_cache() -> None:
    """Forget what earlier scans learnt about image files (they are re-read and re-decoded next time)."""
    with _CACHE_LOCK:
        _PROBE_CACHE.clear()


def _probe_cached(cand: _Candidate, limit: int) -> Probe:
    st = cand.st
    # Re-scans (the GUI refreshes after every caption edit) skip files whose bytes cannot have changed.
    key = (os.path.realpath(cand.path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, limit)
    with _CACHE_LOCK:
        hit = _PROBE_CACHE.get(key)
    if hit is not None:
        return hit
    try:
        probe = probe_image(cand.path, max_pixels=limit)
    except Exception as exc:  # a decoder bug on one odd file must not end the whole scan
        return Probe(error=f"Could not be checked ({type(exc).__name__}: {exc})")
    with _CACHE_LOCK:
        if len(_PROBE_CACHE) >= _CACHE_LIMIT:
            _PROBE_CACHE.clear()
        _PROBE_CACHE[key] = probe
    return probe


def scan_dataset(
    path: Path | str,
    *,
    caption_extension: str = ".txt",
    trigger_word: str = "",
    repeats: dict[str, int] | None = None,
    default_repeats: int = 1,
    min_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    max_pixels: int | None = None,
    workers: int | None = None,
) -> DatasetReport:
    """Walk ``path`` (sub-folders too, links followed once) and check every image and caption.

    Every image decodes fully once (truncation cannot be caught otherwise), on ``workers`` threads
    (Pillow and hashlib release the GIL). Results are cached by file identity for the next scan.
    Raises DatasetError if ``path`` is not a readable folder, ScanCancelled if ``stop`` is set.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"'{root}' does not exist; choose the folder that holds your images")
    if not root.is_dir():
        raise DatasetError(f"'{root}' is a file, not a folder; choose the folder that holds your images")
    root = root.absolute()
    limit = _images.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)  # read now: it can be changed
    try:
        walk = _walk(root, caption_extension)
    except OSError as exc:
        raise DatasetError(f"'{root}' could not be read ({exc.strerror or exc})") from None
    cands = walk.candidates
    probes = _run_probes(cands, limit, progress, stop, workers)

    issues = list(walk.issues)
    items: list[DatasetItem] = []
    seen_hash: dict[str, str] = {}
    caption_owner: dict[Path, str] = {}
    captions: list[tuple[_Candidate, str, str, str]] = []  # (candidate, text, source, note) of each item
    repeats_cache: dict[str, int] = {}
    trigger = trigger_word.strip()

    for cand, probe in zip(cands, probes):
        if probe.error:
            issues.append(DatasetIssue(cand.rel, probe.error, "error", "skipped"))
            continue
        first = seen_hash.get(probe.sha256)
        if first is not None:
            issues.append(DatasetIssue(cand.rel, f"Exact copy of '{first}'", "warning",
                                       "skipped (the first copy is used)"))
            continue
        seen_hash[probe.sha256] = cand.rel
        for note in probe.notes:
            issues.append(DatasetIssue(cand.rel, note.problem, note.severity, note.action))
        if min(probe.width, probe.height) < min_size:
            issues.append(DatasetIssue(
                cand.rel, f"Only {probe.width}×{probe.height} px, smaller than {min_size} px", "warning",
                "used, but enlarged to its bucket, so it will look blurry; replace it with a larger image if you can"))
        if cand.folder not in repeats_cache:
            n, warning = folder_repeats(cand.folder, repeats, default_repeats)
            repeats_cache[cand.folder] = n
            if warning:
                issues.append(DatasetIssue(cand.folder or ".", warning, "warning", f"images in it are repeated {n}×"))
        text, source, note, truncated = _read_caption(cand)
        if cand.caption is not None:
            owner = caption_owner.setdefault(cand.caption, cand.rel)
            if owner != cand.rel:
                issues.append(DatasetIssue(cand.rel, f"Shares its caption file '{cand.caption.name}' with '{owner}'",
                                           "info", "both use the same caption"))
        captions.append((cand, text, source, note, truncated))
        items.append(DatasetItem(
            image_path=cand.path, caption=text, caption_source=source, folder=cand.folder,
            repeats=repeats_cache[cand.folder], width=probe.width, height=probe.height, sha256=probe.sha256,
            mtime_ns=cand.st.st_mtime_ns, size=cand.st.st_size, caption_truncated=truncated,
        ))

    # Missing captions are a slip when other images have them, and a choice (trigger-only training) when none do.
    any_caption = any(source in ("file", "fallback-encoding") for _, _, source, _, _ in captions)
    for cand, text, source, note, truncated in captions:
        used = compose_caption(text, trigger_word=trigger)
        used_as = f"used with caption '{short(used)}'" if used else "used with an empty caption"
        if source == "missing":
            issues.append(DatasetIssue(cand.rel, note or f"No caption file ('{cand.caption_name}')",
                                       "warning" if any_caption else "info", used_as))
        elif source == "empty":
            issues.append(DatasetIssue(cand.rel, f"Caption file '{cand.caption.name}' is empty",  # type: ignore[union-attr]
                                       "warning" if any_caption else "info", used_as))
        elif note:
            severity = "warning" if source == "fallback-encoding" or truncated else "info"
            if truncated:
                used_as += "; the file itself is not changed"
            issues.append(DatasetIssue(cand.rel, note, severity, used_as))

    names = {f.rsplit("/", 1)[-1] for f in walk.folders if f} | {"."}
    for key in repeats or {}:
        if key not in walk.folders and key not in names:
            issues.append(DatasetIssue(key, f"Repeats are set for folder '{key}', but the dataset has no such folder",
                                       "warning", "setting ignored"))
    if items and not any_caption and not trigger:
        # Training still works (kohya allows it), but the LoRA then has no word that calls it up: say so once.
        issues.append(DatasetIssue(".", "No image has a caption and no trigger word is set, so nothing in a prompt "
                                   "will call up what the LoRA learns",
                                   "warning", "trained with empty captions; set a trigger word (Dataset page, "
                                   "dataset.trigger_word) or add caption files"))
    if not items:
        issues.append(DatasetIssue(".", "The folder contains no usable images (png, jpg, jpeg, webp, bmp)",
                                   "error", "nothing to train on"))
    order = {rel: i for i, rel in enumerate(sorted({i.file for i in issues}, key=_path_key))}
    issues.sort(key=lambda i: order[i.file])  # stable: a file's issues keep the order they were found in
    return DatasetReport(root=root, items=items, issues=issues, ignored=walk.ignored, trigger_word=trigger)


def _run_probes(
    cands: list[_Candidate], limit: int, progress: Callable[[int, int], None] | None,
    stop: threading.Event | None, workers: int | None,
) -> list[Probe]:
    total = len(cands)
    if progress:
        progress(0, total)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    results: list[Probe] = []
    if workers <= 1 or total <= 1:
        for cand in cands:
            if stop is not None and stop.is_set():
                raise ScanCancelled("dataset scan stopped")
            results.append(_probe_cached(cand, limit))
            if progress:
                progress(len(results), total)
        return results
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dataset-scan")
    try:
        futures: list[Future] = [pool.submit(_probe_cached, cand, limit) for cand in cands]
        for fut in futures:
            while True:
                if stop is not None and stop.is_set():
                    raise ScanCancelled("dataset scan stopped")
                try:
                    results.append(fut.result(timeout=0.1))
                    break
                except TimeoutError:
                    continue
            if progress:
                progress(len(results), total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _read_caption(cand: _Candidate) -> tuple[str, str, str, bool]:
    """(text, caption_source, note, truncated) for an image's caption file; never raises."""
    if cand.caption is None:
        return "", "missing", "", False
    try:
        decoded = read_caption_file(cand.caption)
    except OSError as exc:
        return "", "missing", f"Caption file '{cand.caption.name}' could not be read ({exc.strerror or exc})", False
    if not decoded.text:
        return "", "empty", "", False
    name = cand.caption.name
    notes = []
    if decoded.truncated:
        from studio.engine.devices import format_bytes

        notes.append(f"Caption file '{name}' is {format_bytes(decoded.file_size or 0)}, far longer than a caption "
                     f"(the text encoder reads a few hundred characters); caption truncated to its first "
                     f"{len(decoded.text):,} characters")
    if decoded.fallback:
        label = "Windows-1252" if decoded.encoding == "cp1252" else "Latin-1"
        notes.append(f"Caption file '{name}' is not UTF-8; read as {label} (re-save it as UTF-8 if letters look wrong)")
        return decoded.text, "fallback-encoding", "; ".join(notes), decoded.truncated
    if decoded.encoding == "utf-16":
        notes.append(f"Caption file '{name}' is UTF-16; read fine, but other tools expect UTF-8")
    if decoded.lines > 1 and not decoded.truncated:
        notes.append(f"Caption file '{name}' has {decoded.lines} lines; they are joined with ', '")
    return decoded.text, "file", "; ".join(notes), decoded.truncated
