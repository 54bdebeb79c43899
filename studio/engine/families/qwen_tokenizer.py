"""Qwen tokenizers for the families whose text encoder is a Qwen model (Z-Image: Qwen3; Qwen-Image: Qwen2.5-VL).

Both use Qwen2's byte-level BPE vocabulary with the chat tokens. The real one comes from the user's files (a
diffusers folder's ``tokenizer/``, a folder beside a single file, ComfyUI's bundled tokenizer, a config folder, or
the local Hugging Face cache); the tiny test models get one built in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from studio.engine.config import ModelSection

CHAT_TOKEN = "<|im_start|>"  # what tells a Qwen chat tokenizer from any other byte-level BPE one


def tokenizer_folders(path: Path, folders: list[Path], model: "ModelSection", *, beside: Iterable[str],
                      hub: Iterable[tuple[str, str]]) -> list[Path]:
    """Where a Qwen tokenizer may be, most specific first: the job's config folder, each part folder (its
    ``tokenizer/`` and the ``beside`` sub-folders, then itself), ComfyUI's bundled Qwen2.5 tokenizer when the model
    lives under a ComfyUI ``models`` folder, then the ``hub`` (repo, sub-folder) snapshots in the local cache."""
    from studio.engine.checkpoint import hub_snapshot

    out = [Path(model.config_dir).expanduser() / "tokenizer"] if model.config_dir else []
    for folder in folders:
        out += [folder / "tokenizer", *(folder / name for name in beside), folder]
    for parent in path.parents:
        if parent.name.lower() == "models":  # ComfyUI's install: <ComfyUI>/models/... and <ComfyUI>/comfy/text_encoders
            out.append(parent.parent / "comfy" / "text_encoders" / "qwen25_tokenizer")
            break
    for repo, sub in hub:
        snapshot = hub_snapshot(repo)
        if snapshot is not None:
            out.append(snapshot / sub)
    return out


def first_tokenizer(candidates: Iterable[Path]) -> Any | None:
    """The first folder's tokenizer that is a Qwen chat tokenizer; None when none is."""
    from transformers import AutoTokenizer

    for folder in candidates:
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception:  # not a tokenizer folder after all; the next candidate may be
            continue
        if CHAT_TOKEN in tokenizer.get_vocab():
            return tokenizer
    return None


def tiny_qwen_tokenizer(model_max_length: int, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer built in code (Qwen2's kind: bytes, <|endoftext|> padding, chat tokens), no merges.

    For the tiny models only; the real vocabulary (151,643 BPE tokens) comes from the user's model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                        padding_side="right")
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                  "additional_special_tokens": [CHAT_TOKEN, "<|im_end|>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
