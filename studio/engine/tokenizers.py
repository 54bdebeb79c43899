"""The bundled CLIP tokenizers: one copy of CLIP's BPE files under resources/tokenizers/clip, in two variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from studio.paths import resource_path

BPE_FILES = ("vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Every CLIP text encoder of SD1/SD2/SDXL uses OpenAI's 49408-token BPE; the variants differ only in how
# prompts are padded. CLIP ViT-L (SD1, SDXL's first encoder) pads with its end token; OpenCLIP (SD2 and
# SDXL's second encoder) pads with token 0, which is "!". The files under resources/ are CLIP-L's.
VARIANTS: dict[str, dict[str, str]] = {"clip-l": {}, "clip-g": {"pad_token": "!"}}


def _variant(name: str) -> dict[str, str]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown bundled tokenizer '{name}'; bundled: {', '.join(VARIANTS)}") from None


def bundled_folder() -> Path:
    """The folder holding the one copy of CLIP's vocabulary, merges and (CLIP-L) configuration."""
    return resource_path("tokenizers", "clip")


def load_tokenizer(name: str) -> Any:
    """A bundled CLIP tokenizer by name ("clip-l" or "clip-g"), offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(bundled_folder(), local_files_only=True, **_variant(name))


def write_tokenizer(name: str, folder: Path) -> Path:
    """Write a bundled tokenizer as a folder, the way real SD folders ship it (vocab + merges + configs).

    Not ``save_pretrained``: that writes a 3.6 MB tokenizer.json whose parsing holds the GIL for ~100 ms on
    every load, which the window's thread would feel while a run starts.
    """
    overrides = _variant(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = bundled_folder()
    for file in BPE_FILES:
        shutil.copyfile(source / file, folder / file)
    for file in CONFIG_FILES:
        config = json.loads((source / file).read_text(encoding="utf-8"))
        config.update({k: v for k, v in overrides.items() if k in config})
        (folder / file).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
