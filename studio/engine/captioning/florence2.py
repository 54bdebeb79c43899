"""Florence-2 captioning through transformers' native Florence2 classes (never the repositories' remote code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.engine.captioning.base import CaptionModelError, CaptionOutput
from studio.engine.captioning.hf_common import load_pretrained, pick_device, read_config
from studio.engine.captioning.options import CaptionOptions


class Florence2Captioner:
    kind = "florence2"

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.folder: Path | None = None

    def load(self, folder: Path, device: str = "cpu") -> None:
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        folder = Path(folder)
        config = read_config(folder)
        if config.get("model_type") != "florence2":
            raise CaptionModelError(f"'{folder}' holds a '{config.get('model_type', 'unknown')}' model, not Florence-2.")
        if "auto_map" in config or (config.get("vision_config") or {}).get("model_type") == "davit":
            # microsoft/Florence-2-* ship their own modelling code; running it would mean trusting that code.
            raise CaptionModelError(
                f"'{folder}' is Microsoft's original Florence-2, which needs code from the model repository to run. "
                "LoRA Studio runs only the converted version that transformers supports itself: use "
                "florence-community/Florence-2-base or florence-community/Florence-2-large.")
        self.device, self.dtype = pick_device(device)
        self.processor = load_pretrained(AutoProcessor, folder, "Florence-2 processor")
        self.model = load_pretrained(Florence2ForConditionalGeneration, folder, "Florence-2 model", dtype=self.dtype)
        self.model.to(self.device).eval()
        self.folder = folder

    def token_limit(self, wanted: int) -> int:
        """``wanted``, but never past the text model's position table (generating past it fails on every image)."""
        table = getattr(self.model.config.text_config, "max_position_embeddings", None) or wanted + 8
        return max(1, min(wanted, table - 8))  # room for the start token and the prompt's own tokens

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        size = f"{params / 1e6:,.0f} M" if params >= 1e6 else f"{params:,}"
        return f"Florence-2 captioner, {size} parameters ({self.device.upper()})"

    def caption(self, images: list[Any], options: CaptionOptions) -> list[CaptionOutput]:
        import torch

        task = options.florence_task
        inputs = self.processor(text=[task] * len(images), images=images, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=inputs["input_ids"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                attention_mask=inputs["attention_mask"].to(self.device),
                max_new_tokens=self.token_limit(options.max_tokens), num_beams=options.beams, do_sample=False)
        # Caption tasks answer in plain text; the special tokens (<s>, </s>, <pad>) are all that needs removing.
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [CaptionOutput(" ".join(t.split())) for t in texts]
