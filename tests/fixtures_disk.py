"""A disk that fills up at a chosen file: what a full disk looks like to the writer, even when run as root."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fail_publishing(monkeypatch, *finals: Path) -> None:
    """The disk fills up while the LoRA file is written: publishing it under ``finals`` fails with ENOSPC (the
    bytes went to the temporary file first, as with a real full disk the write itself would fail)."""
    real_replace = os.replace
    blocked = {str(f) for f in finals}

    def replace(src, dst, *args, **kwargs):
        if str(dst) in blocked:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
