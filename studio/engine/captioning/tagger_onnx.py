"""WD14-style taggers (SmilingWolf's wd-*-tagger repos): model.onnx + selected_tags.csv, run with onnxruntime."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.engine.captioning.base import CaptionModelError, CaptionOutput, TagScore
from studio.engine.captioning.options import CaptionOptions
from studio.engine.captions import split_tags

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
# selected_tags.csv category numbers (Danbooru's): 0 general, 4 character, 9 rating; others are rare and general.
CATEGORIES = {"0": "general", "4": "character", "9": "rating"}
# Emoticon tags (^_^, o_o, >_<, 0_0) lose their meaning with a space; a real word tag always has 3+ letters in a row.
_WORDLIKE = re.compile(r"[A-Za-z]{3,}")


class OnnxTagger:
    kind = "tagger"

    def __init__(self) -> None:
        self.session: Any = None
        self.tags: list[tuple[str, str]] = []  # (name, category)
        self.size = 448
        self.channels_last = True
        self.input_name = ""
        self.provider = "CPU"
        self.folder: Path | None = None

    # ------------------------------------------------------------------------------------------------ load

    def load(self, folder: Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        folder = Path(folder)
        model, tags = folder / MODEL_FILE, folder / TAGS_FILE
        if not model.is_file():
            raise CaptionModelError(f"'{folder}' has no {MODEL_FILE}; a WD14 tagger folder holds {MODEL_FILE} and "
                                    f"{TAGS_FILE}. Choose such a folder, or download a tagger.")
        if not tags.is_file():
            raise CaptionModelError(f"'{folder}' has {MODEL_FILE} but no {TAGS_FILE} (the tag list). Put the "
                                    f"{TAGS_FILE} from the same model repository next to it.")
        self.tags = read_tag_list(tags)
        options = ort.SessionOptions()
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # onnxruntime's own warnings go to stderr, where nobody reads them
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise CaptionModelError(
                f"'{model}' could not be read as an ONNX model ({type(exc).__name__}: {_first_line(exc)}). The file "
                "is damaged or incomplete: download it again.") from None
        self.provider = "GPU" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or (shape[3] != 3 and shape[1] != 3):
            raise CaptionModelError(f"'{model}' takes input of shape {shape}, not images; it is not a WD14 tagger.")
        self.channels_last = shape[3] == 3
        side = shape[1] if self.channels_last else shape[2]
        self.size = side if isinstance(side, int) and side > 0 else 448
        out = self.session.get_outputs()[0].shape
        if len(out) == 2 and isinstance(out[1], int) and out[1] != len(self.tags):
            raise CaptionModelError(f"'{model}' scores {out[1]} tags but {TAGS_FILE} lists {len(self.tags)}; they come "
                                    "from different models. Use the model and tag list of one repository.")
        self.folder = folder

    def describe(self) -> str:
        return f"WD14 tagger, {len(self.tags):,} tags, {self.size} px (onnxruntime, {self.provider})"

    # --------------------------------------------------------------------------------------------- caption

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """Probabilities, one row per image and one column per tag."""
        batch = np.stack([preprocess(im, self.size) for im in images])
        if not self.channels_last:
            batch = batch.transpose(0, 3, 1, 2)
        probs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != len(self.tags):
            raise CaptionModelError(f"The tagger returned scores of shape {probs.shape} for {len(self.tags)} tags; "
                                    "the model and its tag list do not match.")
        if probs.min() < 0 or probs.max() > 1:  # the v3 taggers end in a sigmoid; a graph that ends in logits does not
            probs = 1 / (1 + np.exp(-probs))
        return probs

    def caption(self, images: list[Image.Image], options: CaptionOptions) -> list[CaptionOutput]:
        return [select_tags(row, self.tags, options) for row in self.scores(images)]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """As the WD taggers were trained: transparency on white, padded square with white, ``size`` px, BGR, 0-255."""
    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    rgb = canvas.convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB → BGR


def read_tag_list(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "name" not in reader.fieldnames:
                raise CaptionModelError(f"'{path}' has no 'name' column; a WD14 tag list has the columns "
                                        "tag_id, name, category, count.")
            rows = [(row["name"], CATEGORIES.get((row.get("category") or "0").strip(), "general")) for row in reader]
    except UnicodeDecodeError:
        raise CaptionModelError(f"'{path}' is not a UTF-8 text file; it is not a WD14 tag list.") from None
    except csv.Error as exc:
        raise CaptionModelError(f"'{path}' could not be read as CSV ({exc}).") from None
    if not rows:
        raise CaptionModelError(f"'{path}' lists no tags.")
    return rows


def tag_text(name: str, underscores_to_spaces: bool) -> str:
    if underscores_to_spaces and _WORDLIKE.search(name):
        return name.replace("_", " ")
    return name


def select_tags(probs: np.ndarray, tags: list[tuple[str, str]], options: CaptionOptions) -> CaptionOutput:
    """The caption for one image's scores: thresholds per category, exclusions, order, limit, underscores."""
    excluded = {t.replace("_", " ").casefold() for t in split_tags(options.exclude_tags)}
    general: list[TagScore] = []
    character: list[TagScore] = []
    rating: TagScore | None = None
    for (name, category), p in zip(tags, probs.tolist()):
        if category == "rating":
            if rating is None or p > rating.score:
                rating = TagScore(name, p, category)
            continue
        limit = options.character_threshold if category == "character" else options.general_threshold
        if p < limit or name.replace("_", " ").casefold() in excluded:
            continue
        (character if category == "character" else general).append(TagScore(name, p, category))
    general.sort(key=lambda t: -t.score)
    character.sort(key=lambda t: -t.score)
    if options.characters == "first":
        chosen = character + general
    elif options.characters == "mixed":
        chosen = sorted(character + general, key=lambda t: -t.score)
    else:
        chosen = general
    if options.max_tags:
        chosen = chosen[: options.max_tags]
    if options.rating and rating is not None and rating.name.replace("_", " ").casefold() not in excluded:
        chosen = chosen + [rating]
    text = ", ".join(tag_text(t.name, options.underscores_to_spaces) for t in chosen)
    return CaptionOutput(text, tuple(chosen))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
