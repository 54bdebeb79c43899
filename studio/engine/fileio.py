"""Atomic file writing: a crash or a full disk never leaves half a file under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

# Below this much free space a failed write is a full disk, whatever the library says: torch.save's C++ writer
# reports ENOSPC as "unexpected pos …" with the errno lost. At the moment a write fails for want of space the
# free space is a few blocks at most; the margin allows for other programs filling the same disk.
FULL_DISK_MARGIN = 64 * 1024 * 1024
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122", "enospc",
               "there is not enough space on the disk")
# Programming errors, never the disk's fault, even when it happens to be nearly full.
_NOT_IO = (TypeError, ValueError, KeyError, AttributeError, AssertionError, NotImplementedError, IndexError)


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full, however the writer reported it."""

    def __init__(self, path: Path | str, cause: BaseException | None = None):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.cause = cause


def free_bytes(folder: Path | str) -> int | None:
    """Free space where ``folder`` is (its nearest existing parent), or None if it cannot be told."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, folder: Path | str | None = None) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk is full.

    By errno where there is one; by the message where a library wrapped it (safetensors: "os error 28", torch's
    legacy writer: "No space left on device"); and by the free space left in ``folder`` where the cause was lost
    on the way (torch.save's zip writer), which is only meaningful while the failed write still takes its space.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, Exception) or isinstance(exc, _NOT_IO) and not isinstance(exc, OSError):
        return False
    text = str(exc).lower()
    if any(t in text for t in _FULL_TEXTS):
        return True
    if folder is None:
        return False
    free = free_bytes(folder)
    return free is not None and free < FULL_DISK_MARGIN


def _raise_as_disk_full(exc: BaseException, path: Path, full: bool) -> None:
    """Re-raise a full-disk failure as DiskFullError (an OSError with ENOSPC naming the file), which every caller
    recognises."""
    if full and not isinstance(exc, DiskFullError):
        raise DiskFullError(path, exc) from exc


def create_temp_file(folder: Path, name: str) -> Path:
    """A new empty hidden file in ``folder`` for writing ``name``.

    Made with os.open's mode 0o666, so the system applies the umask (and default ACLs) exactly as for a file
    made by open(); nothing here reads or changes the process-wide umask, which other threads depend on.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = Path(folder) / f".{name}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(Path(folder) / name))


def create_temp_dir(folder: Path, name: str) -> Path:
    """A new hidden folder in ``folder`` for building ``name``; mode 0o777 less the umask, like a plain mkdir."""
    for _ in range(100):
        tmp = Path(folder) / f".{name}.{secrets.token_hex(4)}.partial"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(Path(folder) / name))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it over ``final``.

    On any error the temporary file is removed and ``final`` is left as it was; a write that failed for want of
    space is raised as DiskFullError whatever the writer raised.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_file(final.parent, final.name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if final.exists():  # a replaced file keeps its permissions
            os.chmod(tmp, final.stat().st_mode & 0o7777)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        full = is_disk_full(exc, final.parent)  # before the partial file is removed: it still takes its space
        with contextlib.suppress(OSError):
            tmp.unlink()
        _raise_as_disk_full(exc, final, full)
        raise


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where it is also unnecessary.
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_with(final: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` write to a temporary path (e.g. safetensors' save_file), then publish atomically."""
    with atomic_path(final) as tmp:
        writer(tmp)
