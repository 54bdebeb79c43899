"""Derive Hugging Face CLIP tokenizer files from OpenCLIP's BPE vocabulary (offline, reproducible).

The vocabulary ships (MIT licence) inside the ``open_clip_torch`` wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. Get it with
``pip download --no-deps open_clip_torch`` and run::

    python resources/tokenizers/derive_clip_tokenizer.py path/to/open_clip_torch-*.whl

It writes ``clip/`` next to this script: the vocabulary and merges every SD1/SD2/SDXL text encoder uses, with
CLIP ViT-L's configuration (pads with ``<|endoftext|>``). OpenCLIP's variant (pads with ``!``: SD2 and SDXL's
second tokenizer) is the same files with another pad token; studio/engine/tokenizers.py makes it, so the
vocabulary is stored once.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import zipfile
from pathlib import Path

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # OpenCLIP keeps exactly this many merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(VOCAB_MEMBER)
    lines = gzip.open(io.BytesIO(raw)).read().decode("utf-8").split("\n")
    return lines[1 : N_MERGES + 1]  # line 0 is a header


def build_vocab(merges: list[str]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        # Without this transformers assumes 1e30 and pipelines pad prompts to that length.
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    merges = read_merges(Path(argv[0]))
    vocab = build_vocab(merges)
    assert len(vocab) == 49408, len(vocab)
    here = Path(__file__).resolve().parent
    write_tokenizer(here / "clip", vocab, merges, pad_token="<|endoftext|>")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {here}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
