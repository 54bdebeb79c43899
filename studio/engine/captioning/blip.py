"""BLIP captioning (Salesforce/blip-image-captioning-*) through transformers' native classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.engine.captioning.base import CaptionModelError, CaptionOutput
from studio.engine.captioning.hf_common import load_pretrained, pick_device, read_config
from studio.engine.captioning.options import CaptionOptions


class BlipCaptioner:
    kind = "blip"

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.folder: Path | None = None

    def load(self, folder: Path, device: str = "cpu") -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = Path(folder)
        config = read_config(folder)
        if config.get("model_type") != "blip":
            raise CaptionModelError(f"'{folder}' holds a '{config.get('model_type', 'unknown')}' model, not BLIP.")
        self.device, self.dtype = pick_device(device)
        self.processor = load_pretrained(BlipProcessor, folder, "BLIP processor")
        self.model = load_pretrained(BlipForConditionalGeneration, folder, "BLIP model", dtype=self.dtype)
        self.model.to(self.device).eval()
        self.folder = folder

    def token_limit(self, wanted: int) -> int:
        """``wanted``, but never past the text model's position table (generating past it fails on every image)."""
        table = getattr(self.model.config.text_config, "max_position_embeddings", None) or wanted + 8
        return max(1, min(wanted, table - 8))  # room for the start token and the prompt's own tokens

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        size = f"{params / 1e6:,.0f} M" if params >= 1e6 else f"{params:,}"
        return f"BLIP captioner, {size} parameters ({self.device.upper()})"

    def caption(self, images: list[Any], options: CaptionOptions) -> list[CaptionOutput]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.token_limit(options.max_tokens), num_beams=options.beams,
                                      do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [CaptionOutput(" ".join(t.split())) for t in texts]
