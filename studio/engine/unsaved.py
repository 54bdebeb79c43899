"""A trained LoRA the disk would not take: kept in memory as the file's bytes, to be saved somewhere else.

When the last write of a run fails for want of space (or a folder turned read-only), the training is not lost:
the run's RunFailed carries an UnsavedLora, and the window ("Save LoRA elsewhere…") or the command line
(``--rescue-dir``, a question on a terminal, else a folder with room) writes it where there is space.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from studio.engine.fileio import FULL_DISK_MARGIN, atomic_write_with, free_bytes


class RescueFailed(OSError):
    """The LoRA could not be written where asked; the message says where and why."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@dataclass(frozen=True, eq=False)
class UnsavedLora:
    """The exact bytes of the LoRA file the run meant to write, and what it is."""

    name: str  # the file name the run meant to write, e.g. "my-lora.safetensors"
    step: int  # the training step the weights are from
    meant_for: Path  # where the run tried to write it
    chunks: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)

    def save(self, target: Path | str) -> Path:
        """Write the file atomically: exactly to ``target`` if it names a .safetensors file (a save dialog has
        asked about replacing it), else into the folder ``target`` (made if missing) under its own name, or a free
        numbered one: nothing is overwritten. Raises RescueFailed with a sentence when the write fails."""
        target = Path(target).expanduser()
        is_file = target.suffix.lower() == ".safetensors" and not target.is_dir()
        path = target if is_file else _free_name(target / self.name)

        def writer(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                for chunk in self.chunks:
                    fh.write(chunk)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(path, writer)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise RescueFailed(exc.errno or 0, f"could not write {path} ({why})", str(path)) from exc
        return path

    def fallback_folders(self) -> list[Path]:
        """Where to save it when nobody can be asked: the app's data folder, the home folder, the temporary
        folder, those with room for the file; folders on another disk than the one that failed come first."""
        failed_device = _device_of(self.meant_for)
        from studio.paths import user_data_dir

        candidates = [user_data_dir() / "rescued-loras", Path.home() / "LoRA Studio rescued",
                      Path(tempfile.gettempdir()) / "lora-studio-rescued"]
        roomy = [c for c in candidates if (free_bytes(c) or 0) >= self.size + FULL_DISK_MARGIN]
        return sorted(roomy, key=lambda c: _device_of(c) == failed_device)  # stable: other disks first

    def save_to_fallback(self) -> tuple[Path | None, list[str]]:
        """Try each fallback folder in turn: (where it went or None, why each other one failed)."""
        tried: list[str] = []
        for folder in self.fallback_folders():
            try:
                return self.save(_made(folder)), tried
            except OSError as exc:
                tried.append(str(exc))
        return None, tried


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    for n in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise RescueFailed(0, f"no free file name next to {path}", str(path))


def _device_of(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        try:
            return os.stat(candidate).st_dev
        except OSError:
            continue
    return None


def describe_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


__all__ = ["UnsavedLora", "RescueFailed", "describe_size"]
