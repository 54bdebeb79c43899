"""Find and load a base model offline (single-file checkpoints, diffusers folders, the local HF cache) via its family."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from studio.engine.config import BUILTIN_DEMO_MODEL, ModelSection, TrainingSection
from studio.engine.detect import detect
from studio.engine.families import DEFAULT_FAMILY, ModelBundle, family_of_folder, get_family, supported_text
from studio.engine.model_configs import INDEX, read_folder_configs
from studio.engine.safe_load import ModelLoadError, open_weights
from studio.paths import user_cache_dir

__all__ = [
    "ModelBundle", "ModelLoadError", "load_model", "demo_model_path", "resolve_model_path", "bundled_config_dir",
    "hub_snapshot", "cached_hub_models",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


# ------------------------------------------------------------------------------------------------ finding


def demo_model_path() -> Path:
    """The built-in demo model, ready to load: its shipped weights plus the bundled CLIP tokenizer, in the user cache.

    The weights (resources/demo/model, made by resources/demo/train_demo_model.py) ship without a tokenizer, which
    the app already carries once; the folder here is assembled on first use and again whenever the weights change.
    """
    import hashlib
    import shutil

    from studio.engine.demo import demo_model_folder
    from studio.engine.families.sd_loading import tokenizer_folder
    from studio.engine.tokenizers import write_tokenizer

    source = demo_model_folder()
    if not (source / "model_index.json").is_file():
        raise ModelLoadError(f"The demo model is missing from '{source}'; reinstall LoRA Studio, or recreate it with "
                             "`python resources/demo/train_demo_model.py` in a source checkout")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for p in files:
        digest.update(str(p.relative_to(source)).encode())
        digest.update(p.read_bytes())
    folder = user_cache_dir() / f"demo-model-{digest.hexdigest()[:12]}"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # two apps starting at once do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    family = get_family(DEFAULT_FAMILY)
    for encoder, name in zip(family.text_encoder_names, family.tokenizer_names):
        write_tokenizer(name, tmp / tokenizer_folder(encoder))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder


_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")  # used with fullmatch: "$" would accept a trailing newline


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model id if it is already in the cache; never downloads."""
    if not _HUB_ID.fullmatch(repo_id):
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=str(hf_hub_cache()))
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed cache entry
        return None
    return Path(folder)


def cached_hub_models() -> list[dict[str, Any]]:
    """Stable Diffusion-like models in the local HF cache, for a model picker: ``[{id, path, size_bytes}]``."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(hf_hub_cache())
    except Exception:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            names = {f.file_name for f in revision.files}
            rel = {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files}
            if "model_index.json" in rel or any(n.endswith((".safetensors", ".ckpt")) for n in names):
                found.append({"id": repo.repo_id, "path": str(revision.snapshot_path), "size_bytes": revision.size_on_disk})
                break
    return found


def resolve_model_path(path: str) -> Path:
    """Turn the job's model path into a local path (the demo model is built on first use, hub ids come from the cache)."""
    if path == BUILTIN_DEMO_MODEL:
        return demo_model_path()
    local = Path(path).expanduser()
    if not local.exists() and _HUB_ID.fullmatch(path):
        snapshot = hub_snapshot(path)
        if snapshot is not None:
            return snapshot
    return local


def bundled_config_dir(family: str, prediction_type: str = "epsilon") -> Path:
    """The shipped diffusers config folder of a family (a family may have one per prediction type)."""
    return get_family(family).bundled_config_dir(prediction_type)


def _single_file_in(folder: Path) -> Path:
    """A hub snapshot (or folder) without model_index.json: the one checkpoint file it holds."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(files) == 1:
        return files[0]
    if not files:
        raise ModelLoadError(
            f"'{folder}' is a folder but not a diffusers model (no model_index.json) and holds no checkpoint file; "
            "choose a .safetensors/.ckpt file or a diffusers folder"
        )
    names = ", ".join(p.name for p in files[:6])
    raise ModelLoadError(f"'{folder}' holds several checkpoint files ({names}); choose one of them")


# ------------------------------------------------------------------------------------------------ loading


def load_model(model: ModelSection, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               training: TrainingSection | None = None) -> ModelBundle:
    """Load the model the job names, offline, straight into ``dtype``; raises ModelLoadError with a readable message.

    The family (the job's ``model.family``, or the one that recognises the folder or file) does the loading.
    ``training``: loading for a run with these options. Frozen parts are stored as the job asks while still on the
    host (``Family.store_frozen_on_host``: fp8 T5), and only the VAE and the text encoders move to ``device``; the
    run places the denoiser later (``Family.place_denoiser``), once its LoRA is added and its weights are stored.
    """
    started = time.perf_counter()
    path = resolve_model_path(model.path)
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            bundle = _load_folder(path, model, dtype)
        elif path.is_dir():
            bundle = _load_single_file(_single_file_in(path), model, dtype)
        elif not path.exists():
            hint = (" and it is not a model in the local Hugging Face cache (LoRA Studio never downloads; "
                    "download it first)") if _HUB_ID.fullmatch(model.path) else ""
            raise ModelLoadError(f"'{model.path}' does not exist{hint}; choose a checkpoint file or a diffusers folder")
        else:
            bundle = _load_single_file(path, model, dtype)
    except ModelLoadError:
        raise
    except MemoryError:
        raise ModelLoadError(f"Not enough memory to load '{path.name}' in {str(dtype).removeprefix('torch.')}; close "
                             "other programs or choose a lower precision") from None
    except Exception as exc:  # anything diffusers/transformers raise on odd files becomes a readable message
        raise ModelLoadError(f"'{path.name}' could not be loaded: {type(exc).__name__}: {exc}") from exc
    if training is not None:
        bundle.family.store_frozen_on_host(bundle, training)
    for module in bundle.modules():
        if not (training is not None and module is bundle.denoiser):
            module.to(device)
    bundle.load_time_s = time.perf_counter() - started
    log.info("loaded %s (%s, %s) in %.1f s", path.name, bundle.family.name, bundle.prediction_type, bundle.load_time_s)
    return bundle


def _load_folder(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    found = read_folder_configs(path)  # before diffusers parses them: its errors name neither file nor field
    if found.problems:
        raise ModelLoadError(f"'{path.name}' cannot be loaded: " + "; ".join(found.problems))
    family = get_family(model.family) if model.family != "auto" else family_of_folder(path)
    if family is None:
        kind = (found.get(INDEX) or {}).get("_class_name") or "diffusers"
        raise ModelLoadError(f"'{path.name}' is a {kind} folder; LoRA Studio trains {supported_text()} models")
    return family.load_folder(path, model, dtype)


def _load_single_file(path: Path, model: ModelSection, dtype: torch.dtype) -> ModelBundle:
    read_started = time.perf_counter()
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name, tensor=w.tensor)
    if det.kind != "checkpoint" or det.problem:
        raise ModelLoadError(f"'{path.name}' cannot be used as the base model: {det.problem}.")
    read_time = time.perf_counter() - read_started
    family = get_family(model.family if model.family != "auto" else det.family or DEFAULT_FAMILY)
    bundle = family.load_single_file(path, w, det, model, dtype)
    bundle.extra.setdefault("read_time_s", read_time)
    return bundle
