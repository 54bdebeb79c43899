"""Which captioning models exist, which are on this computer (HF cache or a folder), and what kind a folder holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio.engine.captioning.base import CaptionModelError, Captioner
from studio.engine.captioning.options import KIND_LABELS

TAGGER_FILES = ("model.onnx", "selected_tags.csv")
# Only what the transformers classes read: the repositories also carry pytorch_model.bin and tf_model.h5 copies
# of the same weights, which would double or triple the download.
TRANSFORMERS_FILES = ("*.json", "*.safetensors", "*.txt")


@dataclass(frozen=True)
class ModelSpec:
    """A model LoRA Studio can offer to download."""

    id: str  # Hugging Face hub id
    kind: str
    label: str
    note: str
    approx_bytes: int  # what the download weighs, for when the hub cannot be asked (see hub.download_offer)
    exact: bool = True  # False: approx_bytes is an estimate, shown with "about"

    @property
    def files(self) -> tuple[str, ...]:
        return TAGGER_FILES if self.kind == "tagger" else TRANSFORMERS_FILES


# Sizes are those of the files listed by the repositories (model file + tag list / configs and tokenizer) as of
# 2026-12; the hub is asked again whenever it can be reached.
CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec("SmilingWolf/wd-eva02-large-tagger-v3", "tagger", "WD EVA02-Large tagger v3",
              "the most accurate WD tagger; anime and illustration tags", 1_260_435_999 + 308_468),
    ModelSpec("SmilingWolf/wd-vit-tagger-v3", "tagger", "WD ViT tagger v3", "fast, a little less accurate",
              378_000_000, exact=False),
    ModelSpec("SmilingWolf/wd-swinv2-tagger-v3", "tagger", "WD SwinV2 tagger v3", "a good balance of speed and accuracy",
              467_460_978 + 308_468),
    ModelSpec("SmilingWolf/wd-convnext-tagger-v3", "tagger", "WD ConvNext tagger v3", "the smallest WD tagger",
              394_990_732 + 308_468),
    ModelSpec("Salesforce/blip-image-captioning-base", "blip", "BLIP base", "short captions of photos, fast",
              990_000_000, exact=False),
    ModelSpec("Salesforce/blip-image-captioning-large", "blip", "BLIP large", "short captions of photos, better",
              1_880_000_000, exact=False),
    ModelSpec("florence-community/Florence-2-base", "florence2", "Florence-2 base",
              "captions from one line to a paragraph", 930_000_000, exact=False),
    ModelSpec("florence-community/Florence-2-large", "florence2", "Florence-2 large",
              "captions from one line to a paragraph, more accurate", 3_110_000_000, exact=False),
)


def spec_for(model_id: str) -> ModelSpec | None:
    return next((s for s in CATALOG if s.id == model_id), None)


@dataclass(frozen=True)
class FoundModel:
    """A captioning model on this computer."""

    ref: str  # what to pass as the model: a hub id (from the cache) or a folder path
    kind: str
    path: Path
    label: str
    size_bytes: int


# ------------------------------------------------------------------------------------------------ identify


def identify(folder: Path) -> str | None:
    """The kind of captioning model in ``folder`` ("tagger", "blip", "florence2"), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "model.onnx").is_file() or (folder / "selected_tags.csv").is_file():
        return "tagger"
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
        return {"blip": "blip", "florence2": "florence2"}.get(model_type)
    return None


def resolve(model: str) -> Path:
    """The local folder of ``model``: a folder, a model file in one, or a hub id already in the HF cache."""
    text = model.strip()
    if not text:
        raise CaptionModelError("No captioning model is chosen. Pick one from the list, or choose its folder.")
    local = Path(text).expanduser()
    if local.is_file():
        return local.parent  # e.g. model.onnx chosen directly: the tag list sits next to it
    if local.is_dir():
        return local
    from studio.engine.checkpoint import hub_snapshot

    snapshot = hub_snapshot(text)
    if snapshot is not None:
        return snapshot
    known = spec_for(text)
    if known is not None:
        raise CaptionModelError(f"{known.label} ({text}) is not on this computer yet. Download it first "
                                "(LoRA Studio asks before it downloads anything).")
    raise CaptionModelError(f"'{text}' is neither a folder nor a model in the Hugging Face cache. Choose the model's "
                            "folder, or one of the models LoRA Studio offers.")


def load_captioner(model: str, kind: str | None = None, device: str = "auto") -> Captioner:
    """A loaded captioner for ``model``; ``kind`` (when given) must match what the folder holds."""
    folder = resolve(model)
    found = identify(folder)
    if found is None:
        raise CaptionModelError(
            f"'{folder}' does not hold a captioning model: a WD14 tagger has model.onnx and selected_tags.csv, BLIP "
            "and Florence-2 have a config.json. Choose another folder.")
    if kind and kind != found:
        raise CaptionModelError(f"'{folder}' holds a {KIND_LABELS[found]}, not a {KIND_LABELS[kind]}. Choose "
                                f"'{found}' as the kind, or pick a {kind} model.")
    captioner = new_captioner(found)
    captioner.load(folder, device)
    return captioner


def new_captioner(kind: str) -> Captioner:
    if kind == "tagger":
        from studio.engine.captioning.tagger_onnx import OnnxTagger

        return OnnxTagger()
    if kind == "blip":
        from studio.engine.captioning.blip import BlipCaptioner

        return BlipCaptioner()
    if kind == "florence2":
        from studio.engine.captioning.florence2 import Florence2Captioner

        return Florence2Captioner()
    raise CaptionModelError(f"Unknown kind of captioning model '{kind}'; use one of {', '.join(KIND_LABELS)}.")


# --------------------------------------------------------------------------------------------- find


def _complete(folder: Path, kind: str) -> bool:
    if kind == "tagger":
        return all((folder / name).is_file() for name in TAGGER_FILES)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _size(folder: Path) -> int:
    total = 0
    for p in folder.iterdir():
        try:
            total += p.stat().st_size  # follows the cache's links to the blobs
        except OSError:
            pass
    return total


def find_offline(folders: list[Path] | tuple[Path, ...] = ()) -> list[FoundModel]:
    """Complete captioning models in the HF cache (catalog models first) and in ``folders``; reads no weights."""
    from studio.engine.checkpoint import hf_hub_cache

    found: list[FoundModel] = []
    seen: set[Path] = set()

    def add(ref: str, folder: Path, label: str) -> None:
        kind = identify(folder)
        if kind is None or not _complete(folder, kind) or folder.resolve() in seen:
            return
        seen.add(folder.resolve())
        found.append(FoundModel(ref, kind, folder, label, _size(folder)))

    hub = hf_hub_cache()
    for spec in CATALOG:
        repo = hub / ("models--" + spec.id.replace("/", "--"))
        for snapshot in _snapshots(repo):
            add(spec.id, snapshot, spec.label)
    if hub.is_dir():
        for repo in sorted(hub.glob("models--*")):
            repo_id = repo.name[len("models--"):].replace("--", "/")
            for snapshot in _snapshots(repo):
                add(repo_id, snapshot, repo_id)
    for folder in folders:
        folder = Path(folder).expanduser()
        add(str(folder), folder, folder.name)
    return found


def _snapshots(repo: Path) -> list[Path]:
    """The repo's snapshot for its main ref first, then the others (newest first)."""
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return []
    ordered = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    main = repo / "refs" / "main"
    try:
        head = main.read_text().strip()
    except OSError:
        head = ""
    return sorted(ordered, key=lambda p: p.name != head)[:1]
