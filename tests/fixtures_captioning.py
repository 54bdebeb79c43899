"""Tiny random captioning models of each kind, built locally (tests never download): a WD14-style ONNX tagger
exported with torch.onnx plus its tag list, a BLIP and a Florence-2 made from small transformers configs with
tokenizers built in code."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

# (name, category) as in SmilingWolf's selected_tags.csv: 9 rating, 0 general, 4 character.
TINY_TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("circle", 0), ("square", 0), ("triangle", 0), ("simple_background", 0), ("white_background", 0),
    ("no_humans", 0), ("flat_color", 0), ("^_^", 0), ("studio_chan", 4), ("shape_kun", 4),
]
WORDS = ("a photo of red blue green orange purple teal circle square triangle shape on white background with the "
         "and small large flat illustration black outline drawing").split()


def build_tiny_tagger(folder: Path, side: int = 32) -> Path:
    """model.onnx (NHWC float32 input of ``side`` px, dynamic batch, sigmoid outputs) + selected_tags.csv."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)

    class TinyTagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.head = torch.nn.Linear(8, len(TINY_TAGS))

        def forward(self, x):  # x: N, H, W, 3 in BGR 0..255, as the real taggers take it
            x = x.permute(0, 3, 1, 2) / 255.0
            return torch.sigmoid(self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))) * 4)

    torch.manual_seed(0)
    model = TinyTagger().eval()
    with warnings.catch_warnings():
        # The TorchScript exporter needs only `onnx`; the newer dynamo one would add onnxscript and ~8 s per build.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, side, side, 3),), str(folder / "model.onnx"), dynamo=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(TINY_TAGS):
            writer.writerow([i, name, category, 1000 - i])
    return folder


def build_tiny_blip(folder: Path) -> Path:
    """A 1-layer BLIP (32-px images) with a WordPiece tokenizer, saved as from_pretrained reads it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", model_max_length=64)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                         eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_florence2(folder: Path) -> Path:
    """A 1-layer Florence-2 (DaViT stage + BART) with a byte-level BPE tokenizer, for the native transformers classes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (BartTokenizerFast, CLIPImageProcessorPil, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # Only the letters of the words (no full byte alphabet): random weights then still generate readable words.
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    prompts = ["What does the image describe?", "Describe in detail what is shown in the image.",
               "Describe with a paragraph what is shown in the image."]
    bpe.train_from_iterator([" ".join(WORDS)] * 3 + prompts, trainer=trainer)
    tokenizer = BartTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                  extra_special_tokens={"image_token": "<image>"}, model_max_length=256)
    side, stride = 32, 4
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=256, d_model=16,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         encoder_attention_heads=2, decoder_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[stride], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=4, projection_dim=16,
                           max_position_embeddings=16),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    # One token per feature-map cell plus the pooled one, as the real processor counts them (577 at 768 px).
    image_processor = CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                            image_seq_length=(side // stride) ** 2 + 1)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_models(root: Path) -> dict[str, Path]:
    return {"tagger": build_tiny_tagger(root / "tiny-tagger"), "blip": build_tiny_blip(root / "tiny-blip"),
            "florence2": build_tiny_florence2(root / "tiny-florence2")}
