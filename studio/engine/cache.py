"""Latent and text-embedding caches: encode once, keyed by content and settings, reused across runs on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from studio.engine.fileio import atomic_write_with
from studio.paths import user_cache_dir

log = logging.getLogger(__name__)


def model_fingerprint(source: str, *parts: Any) -> str:
    """Identify a model cheaply: its path plus the size and mtime of every weight file under it.

    Hashing gigabytes of weights would cost more than the cache saves; size+mtime changes whenever the file does.
    """
    h = hashlib.sha256(str(Path(source).expanduser().resolve()).encode())
    root = Path(source).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:24]


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TensorCache:
    """A dict of named tensors kept in memory and, optionally, on disk under ``user_cache_dir()/<kind>``.

    Keys already contain everything the value depends on (content hash, model fingerprint, size, dtype),
    so a changed input never hits a stale entry: it simply has another key.
    """

    def __init__(self, kind: str, *, to_disk: bool, root: Path | None = None):
        self.kind = kind
        self.to_disk = to_disk
        self.root = (root or user_cache_dir()) / kind
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        value = self._read(key) if self.to_disk else None
        if value is None:
            self.misses += 1
            value = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
            if self.to_disk:
                self._write(key, value)
        else:
            self.hits += 1
        self._memory[key] = value
        return value

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._file(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("cache entry %s unreadable (%s); recomputing", path, exc)
            return None

    def _write(self, key: str, value: dict[str, torch.Tensor]) -> None:
        try:
            atomic_write_with(self._file(key), lambda tmp: save_file(value, str(tmp)))
        except OSError as exc:  # a full or read-only cache disk must not stop training
            log.warning("could not write cache entry (%s); continuing with the memory cache", exc)
            self.to_disk = False

    def __len__(self) -> int:
        return len(self._memory)

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self._memory.values() for t in v.values())


def cache_disk_usage(kind: str) -> int:
    root = user_cache_dir() / kind
    return sum(f.stat().st_size for f in root.rglob("*.safetensors")) if root.is_dir() else 0


def clear_cache(kind: str) -> None:
    import shutil

    shutil.rmtree(user_cache_dir() / kind, ignore_errors=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
