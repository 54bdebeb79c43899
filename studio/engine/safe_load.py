"""Read weight files without trusting them: safetensors headers checked before anything is allocated, pickles only weights-only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from studio.engine.jsonfile import JsonFileError, parse_json, read_json_object


class ModelLoadError(Exception):
    """A base model that cannot be used; the message says what the file is and what to do."""


# A real header is a few hundred KB even for SDXL (~2,500 tensors); 100 MB leaves room for huge metadata
# while refusing lengths that would make us allocate gigabytes for "JSON".
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 1_000_000

# Bytes per element of each safetensors dtype (sub-byte float formats are not used by SD checkpoints).
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
}
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}

SAFETENSORS_HINT = "Use the .safetensors version of this model (most model pages offer one)."


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # torch dtype name, e.g. "float16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    file_size: int


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"'{path}' cannot be read: {exc.strerror or exc}") from None


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; every tensor must lie inside the file with a consistent size."""
    path = Path(path)
    size = _size(path)
    name = path.name
    if size < 8:
        raise ModelLoadError(f"'{name}' is only {size} bytes: it is empty or was cut off while downloading")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1] <= 5):
            raise ModelLoadError(
                f"'{path}' is named .safetensors but is a PyTorch pickle file (a .ckpt/.bin/.pt renamed); it is not "
                "the file it claims to be. Get the real .safetensors file, or give the .ckpt as the model instead"
            )
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES:
            raise ModelLoadError(
                f"'{name}' is not a valid safetensors file: its header claims {n:,} bytes (damaged or not a model)"
            )
        if 8 + n > size:
            raise ModelLoadError(
                f"'{name}' is incomplete: its header needs {n:,} bytes but the file has {size:,}; download it again"
            )
        raw = fh.read(n)
    try:
        header = parse_json(raw, f"the header of '{name}'")
    except JsonFileError:
        raise ModelLoadError(f"'{name}' is not a valid safetensors file (its header is not JSON); the file is damaged") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"'{name}' is not a valid safetensors file (unexpected header)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelLoadError(f"'{name}' has malformed metadata (values must be text); the file is damaged")
    if len(header) > MAX_TENSORS:
        raise ModelLoadError(f"'{name}' claims {len(header):,} tensors; that is not a model file")
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _check_entry(name, key, entry, data_start, data_len)
    spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
    for (s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ModelLoadError(f"'{name}' is damaged: tensors '{k0}' and '{k1}' overlap")
    return SafetensorsHeader(tensors, dict(metadata), n, size)


def _check_entry(name: str, key: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    bad = f"'{name}' is damaged: the entry for '{key}'"
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{bad} is not a tensor description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelLoadError(f"{bad} has an unsupported data type {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelLoadError(f"{bad} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise ModelLoadError(f"{bad} has invalid offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelLoadError(f"{bad} has invalid offsets {offsets!r}")
    if end > data_len:
        raise ModelLoadError(
            f"'{name}' is incomplete: '{key}' ends {end - data_len:,} bytes past the end of the file; download it again"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ModelLoadError(f"{bad} holds {end - begin:,} bytes but its shape {tuple(shape)} needs {expected:,}")
    return TensorInfo(DTYPE_NAMES[dtype], tuple(shape), data_start + begin, data_start + end)


def load_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None,
                     header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checked safetensors file, memory-mapped (pages are read when a tensor is used)."""
    from safetensors import safe_open

    path = Path(path)
    header = header or read_safetensors_header(path)
    wanted = list(header.tensors) if keys is None else list(keys)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in wanted}
    except Exception as exc:  # the header passed our checks, so this is I/O or a format corner case
        raise ModelLoadError(f"'{path.name}' could not be read ({exc}); the file may be damaged") from exc


# ------------------------------------------------------------------------------------------------ pickles
#
# Real Stable Diffusion .ckpt files were written by PyTorch Lightning: besides the state dict they hold the
# ModelCheckpoint callback class (as a dict key), numpy scalars and dtypes. torch's weights-only unpickler
# refuses those names, so we allow inert stand-ins registered under exactly those names. They only store
# what the pickle hands them; nothing is imported and no code from the file runs.


class _Inert:
    """Stands in for an object of a class we do not import; keeps the pickled state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class LightningModelCheckpoint(_Inert):
    """pytorch_lightning's ModelCheckpoint callback (older Lightning used the class itself as a dict key)."""


class NumpyDType(_Inert):
    """numpy.dtype('f8', False, True) + BUILD state; keeps the type code and byte order."""

    @property
    def code(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def byteorder(self) -> str:
        state = self.state
        return state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>=|" else "<"


class NumpyArray(_Inert):
    """numpy.ndarray rebuilt by ``_reconstruct``; the data is kept as bytes, never interpreted."""


_STRUCT_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H",
                 "u4": "I", "u8": "Q", "b1": "?"}


def _numpy_scalar(dtype: Any = None, data: Any = None) -> Any:
    """numpy.core.multiarray.scalar: decode plain numbers (e.g. a callback's best score); anything else stays inert."""
    if isinstance(dtype, NumpyDType) and isinstance(data, (bytes, bytearray)):
        code = _STRUCT_CODES.get(dtype.code.lstrip("<>=|"))
        if code and struct.calcsize(code) == len(data):
            order = ">" if dtype.byteorder == ">" else "<"
            return struct.unpack(order + code, bytes(data))[0]
    return _Inert(dtype, data)


def _numpy_reconstruct(*args: Any) -> NumpyArray:
    return NumpyArray(*args)


def _stand_ins() -> list[tuple[Any, str]]:
    entries: list[tuple[Any, str]] = []
    for module in ("pytorch_lightning.callbacks.model_checkpoint", "lightning.pytorch.callbacks.model_checkpoint"):
        entries.append((LightningModelCheckpoint, f"{module}.ModelCheckpoint"))
    entries.append((LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"))
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((_numpy_scalar, f"{module}.scalar"))
        entries.append((_numpy_reconstruct, f"{module}._reconstruct"))
    entries.append((NumpyDType, "numpy.dtype"))
    entries.append((NumpyArray, "numpy.ndarray"))
    return entries


# Names whose presence means the file would run code if opened with plain pickle.
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "runpy", "importlib", "shutil",
                 "socket", "pty", "webbrowser", "code", "pickle", "marshal", "ctypes", "types", "functools",
                 "operator", "multiprocessing", "commands", "platform", "pathlib", "io", "codecs", "timeit", "pdb")


@contextmanager
def _allowlist() -> Iterator[None]:
    with torch.serialization.safe_globals(_stand_ins()):
        yield


def sniff_format(path: str | os.PathLike) -> str:
    """'safetensors', 'zip-pickle', 'pickle', 'gguf', 'lfs-pointer' or 'unknown', from the first bytes."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "zip-pickle"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"version https://git-lfs"):
        return "lfs-pointer"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _global_names(text: str) -> list[str]:
    return re.findall(r"GLOBAL ([\w.]+)", text) or re.findall(r"function ([\w.<>]+)", text)


_SCAN_LIMIT = 256 * 1024 * 1024


def _scan_pickle_globals(path: Path) -> list[str]:
    """Every global a non-zip pickle names, read statically (pickletools; nothing is built or run).

    torch stops at the first disallowed name, which may be a harmless one; this lists them all so the
    message can say when code would run. Only for files small enough to read quickly.
    """
    import pickletools

    if path.stat().st_size > _SCAN_LIMIT:
        return []
    found: list[str] = []
    strings: list[str] = []
    with open(path, "rb") as fh:
        for _ in range(8):  # torch's legacy format is several pickles in a row
            try:
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name == "GLOBAL" and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:
                break
    return found


def _refusal(name: str, globals_found: list[str]) -> ModelLoadError:
    dangerous = [g for g in globals_found if g.split(".")[0] in _CODE_MODULES]
    shown = ", ".join(sorted(set(dangerous or globals_found))[:5]) or "unknown objects"
    if dangerous:
        what = f"contains instructions that would run code on your computer when opened ({shown})"
    else:
        what = f"contains Python objects LoRA Studio does not load ({shown})"
    return ModelLoadError(
        f"'{name}' {what}. LoRA Studio refused to open it and nothing from it was executed. {SAFETENSORS_HINT}"
    )


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a .ckpt/.pt/.bin with torch's weights-only unpickler and our inert stand-ins; never executes code."""
    path = Path(path)
    name = path.name
    fmt = sniff_format(path)
    if fmt not in ("zip-pickle", "pickle"):
        raise ModelLoadError(f"'{name}' is not a PyTorch checkpoint (unrecognised content); the file may be damaged")
    if fmt == "zip-pickle":
        # Reads only the archive's directory (at the end of the file), so a cut-off download fails here.
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise ModelLoadError(f"'{name}' is incomplete or damaged (its archive cannot be read); download it again") from None
        # Name every disallowed global up front (reads the pickle's opcodes only), so the message is complete.
        with _allowlist():
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:
                unsafe = []
        if unsafe:
            raise _refusal(name, list(unsafe))
    with _allowlist():
        try:
            # mmap keeps tensor data in the file's pages (read on use) instead of copying gigabytes into RAM;
            # only the zip format supports it.
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=fmt == "zip-pickle")
        except pickle.UnpicklingError as exc:
            found = _global_names(str(exc))
            if fmt == "pickle":
                allowed = {name for _obj, name in _stand_ins()}
                try:
                    allowed |= set(torch._weights_only_unpickler._get_allowed_globals())
                except Exception:  # private API: without it the list is only longer
                    pass
                found = [g for g in _scan_pickle_globals(path) if g not in allowed] or found
            if found or "GLOBAL" in str(exc) or "allowlisted" in str(exc) or "unrecognized function" in str(exc):
                raise _refusal(name, found) from None
            raise ModelLoadError(f"'{name}' is damaged or not a model ({exc}). {SAFETENSORS_HINT}") from None
        except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, struct.error) as exc:
            raise ModelLoadError(
                f"'{name}' is incomplete or damaged and cannot be read ({type(exc).__name__}); download it again"
            ) from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: unwraps Lightning's ``state_dict`` nesting, drops everything else."""
    for _ in range(4):
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            obj = obj["model"]
        else:
            break
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# -------------------------------------------------------------------------------------------- one view


@dataclass
class WeightsFile:
    """One weight file's tensor names, shapes and dtypes, with tensors fetched on demand (memory-mapped)."""

    path: Path
    format: str  # "safetensors" | "zip-pickle" | "pickle"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    _header: SafetensorsHeader | None = None
    _tensors: dict[str, torch.Tensor] | None = None

    @property
    def format_label(self) -> str:
        return {"safetensors": "safetensors", "zip-pickle": "PyTorch pickle (.ckpt)",
                "pickle": "PyTorch pickle, legacy format"}[self.format]

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors([key])[key]

    def tensors(self, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        keys = list(self.shapes) if keys is None else list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        return load_safetensors(self.path, keys, self._header)


def open_weights(path: str | os.PathLike) -> WeightsFile:
    """Open a weight file by its content (not its extension): safetensors header-only, pickles weights-only."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"'{path}' does not exist or is not a file")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        header = read_safetensors_header(path)
        return WeightsFile(path, fmt, {k: t.shape for k, t in header.tensors.items()},
                           {k: t.dtype for k, t in header.tensors.items()}, header.metadata, _header=header)
    if fmt in ("zip-pickle", "pickle"):
        tensors = extract_state_dict(load_pickle(path))
        if not tensors:
            raise ModelLoadError(f"'{path.name}' holds no model weights")
        return WeightsFile(path, fmt, {k: tuple(v.shape) for k, v in tensors.items()},
                           {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}, _tensors=tensors)
    if fmt == "gguf":
        raise ModelLoadError(f"'{path.name}' is a GGUF (quantised) file; LoRA Studio trains on full-precision "
                             "checkpoints. Use the .safetensors version of the model.")
    if fmt == "lfs-pointer":
        raise ModelLoadError(f"'{path.name}' is a Git LFS pointer, not the model itself: the download was incomplete "
                             "(run `git lfs pull` or download the file directly)")
    if path.stat().st_size < 8:
        raise ModelLoadError(f"'{path.name}' is empty or was cut off while downloading")
    raise ModelLoadError(f"'{path.name}' is not a model file LoRA Studio can read (expected .safetensors or .ckpt)")


# ----------------------------------------------------------------------------------------------- hashes


def file_hashes(path: str | os.PathLike, *, chunk: int = 8 * 1024 * 1024) -> dict[str, str]:
    """sha256 of the whole file plus AUTOMATIC1111's two names for it.

    A1111 shows ``shorthash`` = first 10 hex digits of the file's sha256 (what Civitai calls AutoV2), and kept its
    legacy "model hash" = first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (AutoV1).
    """
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    full = digest.hexdigest()
    return {"sha256": full, "a1111_shorthash": full[:10], "a1111_legacy_hash": legacy}


def cached_file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """file_hashes, remembered per (path, size, mtime) in the user cache: hashing 7 GB takes a while."""
    from studio.paths import user_cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = user_cache_dir() / "file-hashes.json"
    try:
        cache = read_json_object(store, max_bytes=16 * 1024 * 1024)
    except JsonFileError:
        cache = {}
    if isinstance(cache.get(key), dict):
        return cache[key]
    result = file_hashes(path)
    cache[key] = result
    try:
        from studio.engine.fileio import atomic_write_text

        # Keep the cache small: the most recent entries win.
        trimmed = dict(list(cache.items())[-500:])
        atomic_write_text(store, json.dumps(trimmed))
    except OSError:
        pass  # a cache that cannot be written only costs time
    return result
