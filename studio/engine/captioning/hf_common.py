"""What the two transformers captioners share: reading a local model folder safely, device and precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.engine.captioning.base import CaptionModelError


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CaptionModelError(f"'{folder}' has no config.json, so it is not a transformers model folder. Choose the "
                                "folder that holds config.json and model.safetensors.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaptionModelError(f"'{path}' could not be read ({exc}); the download is damaged: download it again.") from None


def pick_device(device: str) -> tuple[str, Any]:
    """(device, dtype): half precision on a GPU (as the models are published), float32 on the CPU."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from the folder only: never the hub, never code shipped with the model."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)
    except CaptionModelError:
        raise
    except Exception as exc:  # safetensors, json and tokenizers errors all mean: the files are not usable
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CaptionModelError(f"The {what} in '{folder}' could not be loaded ({type(exc).__name__}: {text}). A file is "
                                "missing or damaged: download the model again.") from None
