"""A tiny T5 tokenizer built in code (a `tokenizers` Unigram model in T5TokenizerFast): tests and the tiny models only.

T5's real SentencePiece vocabulary is not bundled (see parts.T5_TOKENIZER_FILES); the tiny models need a
tokenizer of the same kind, made without any file: a word-level Unigram vocabulary of a few hundred pieces.
"""

from __future__ import annotations

import string
from typing import Any

_WORDS = (
    "a an the of and with in on at to is red blue green yellow black white circle square triangle photo picture "
    "painting drawing style man woman dog cat tree house sky car small big bright dark light shape object"
).split()


def tiny_t5_tokenizer(model_max_length: int = 32) -> Any:
    """T5TokenizerFast over a small Unigram vocabulary: <pad>=0, </s>=1, <unk>=2 as in T5; appends </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["▁" + w for w in _WORDS] + ["▁" + c for c in string.ascii_lowercase + string.digits]
    pieces += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [(p, 0.0 if p.startswith("<") else -float(len(p) < 3) - 1.0 / (1 + len(p))) for p in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" +", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
