"""The engine calls the window makes, in one place: imported late (torch is slow to import, and pieces of the
engine may be missing in a partial install) and easy to replace with fakes in tests."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.engine.config import BUILTIN_DEMO_MODEL, DatasetSection, Job, ModelSection

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

# diffusers and transformers import most classes lazily, on first use. Two threads making their first imports
# at once can meet in a circular import, where Python hands one of them a half-initialised module: "cannot
# import name 'DDPMScheduler' from 'diffusers'" (seen when training started while the Model page was reading
# a model). So the window's threads import the engine's libraries one at a time, through this lock.
_IMPORT_LOCK = threading.RLock()
_warmed_up = False


def warm_up_engine() -> None:
    """Import the libraries the engine uses, once per process and one thread at a time (see _IMPORT_LOCK)."""
    global _warmed_up
    if _warmed_up:
        return
    with _IMPORT_LOCK:
        if _warmed_up:
            return
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from studio.engine.families import registered

        # Touch the lazily imported names each family uses, so later uses are plain attribute look-ups.
        for family in registered():
            family.warm_up()
        import studio.engine.checkpoint  # noqa: F401
        import studio.engine.export  # noqa: F401
        import studio.engine.sampling  # noqa: F401
        import studio.engine.trainer  # noqa: F401
        _warmed_up = True


def _dataset_module():
    with _IMPORT_LOCK:  # it imports torch, which may be being imported by another thread
        from studio.engine import dataset
    return dataset


# ------------------------------------------------------------------------------------------------ model


def model_parts(family: str, model: dict) -> list[tuple[str, str, str | None, bool]]:
    """(part name, label for people, file or None, required) of each part the job's model file lacks or names (the
    family says which); a file named for the wrong part raises ModelLoadError with the sentence to show."""
    from studio.engine.config import ModelSection
    from studio.engine.families import get_family

    fam = get_family(family)
    section = ModelSection(**model)
    found = fam.part_files(Path(section.path), section)
    parts = {p.name: p for p in fam.parts()}
    return [(name, parts[name].label if name in parts else name, str(file) if file else None,
             parts[name].required if name in parts else True) for name, file in found.items()]


def inspect_model(path: str) -> dict:
    """What the engine can tell about a base model without loading it (family, prediction type, size, dtype)."""
    if path == BUILTIN_DEMO_MODEL:
        from studio.engine.demo import DEMO_RESOLUTION, demo_model_size_bytes
        from studio.engine.families import DEFAULT_FAMILY, family_label

        return {"kind": "checkpoint", "family": DEFAULT_FAMILY, "family_label": family_label(DEFAULT_FAMILY),
                "prediction_type": "epsilon", "native_resolution": DEMO_RESOLUTION, "dtype": "float16",
                "size_bytes": demo_model_size_bytes(), "builtin": True, "path": path}
    from studio.engine.inspection import inspect_path

    return inspect_path(Path(path).expanduser())


def model_search_roots() -> list[Path]:
    """Folders where people usually keep checkpoints (A1111, Forge, ComfyUI, InvokeAI)."""
    home = Path.home()
    roots = []
    for app in ("stable-diffusion-webui", "stable-diffusion-webui-forge", "sd-webui-forge", "automatic1111"):
        roots.append(home / app / "models" / "Stable-diffusion")
    for app in ("ComfyUI", "comfyui", "ComfyUI_windows_portable/ComfyUI"):
        roots.append(home / app / "models" / "checkpoints")
    roots.append(home / "invokeai" / "models")
    return roots


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def find_models(stop: threading.Event | None = None) -> list[Path]:
    """Checkpoints and diffusers folders in the usual places; quick, by name only (nothing is opened)."""
    found: list[Path] = []
    for root in model_search_roots():
        if stop is not None and stop.is_set():
            break
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in (".safetensors", ".ckpt") and p.stat().st_size > 100_000_000:
                found.append(p)
            elif p.is_dir() and (p / "model_index.json").is_file():
                found.append(p)
    hub = hf_hub_cache()
    if hub.is_dir():
        for snapshot in sorted(hub.glob("models--*/snapshots/*")):
            if (snapshot / "model_index.json").is_file() and (snapshot / "unet").is_dir():
                found.append(snapshot)
    return found


def hub_name(path: Path) -> str | None:
    """``models--org--name/snapshots/<sha>`` → ``org/name``."""
    for part in path.parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


# ---------------------------------------------------------------------------------------------- dataset


@dataclass
class DatasetScan:
    """A dataset report plus the bucket plan, as the Dataset page shows them."""

    report: Any  # studio.engine.dataset.DatasetReport
    buckets: dict[tuple[int, int], int]  # bucket size → image count


def scan_dataset(section: DatasetSection, progress: Callable[[Any], None] | None = None,
                 stop: threading.Event | None = None) -> DatasetScan:
    report = _dataset_module().scan_dataset(
        section.path, caption_extension=section.caption_extension, trigger_word=section.trigger_word,
        repeats=section.repeats, default_repeats=section.default_repeats, stop=stop,
        progress=(lambda done, total: progress((done, total))) if progress else None,
    )
    return DatasetScan(report, plan_buckets(report.items, section))


def plan_buckets(items: list, section: DatasetSection) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for size in _dataset_module().plan_buckets(items, section.resolution, section.bucket_step, section.buckets):
        size = (int(size[0]), int(size[1]))
        counts[size] = counts.get(size, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def save_caption(image_path: Path, text: str, caption_extension: str) -> None:
    _dataset_module().save_caption(image_path, text, caption_extension)


def make_thumbnails(paths: list[Path], size: int, progress: Callable[[Any], None],
                    stop: threading.Event | None = None) -> None:
    """Small RGBA copies of each image, reported in batches as ``[(path, PIL.Image)]`` (the GUI converts them)."""
    from PIL import Image, ImageOps

    batch: list[tuple[Path, Any]] = []
    for path in paths:
        if stop is not None and stop.is_set():
            return
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))  # JPEG decodes at reduced size: much faster for big photos
                thumb = ImageOps.exif_transpose(im).convert("RGBA")
                thumb.thumbnail((size, size))
        except Exception:
            thumb = None
        batch.append((path, thumb))
        if len(batch) >= 8:
            progress(batch)
            batch = []
    if batch:
        progress(batch)


# --------------------------------------------------------------------------------------------- estimate


def estimate(job: Job) -> Any | None:
    """The engine's time and memory estimate (seconds_per_step, total_seconds, gpu_memory_bytes, warnings)."""
    from studio.engine.estimate import estimate as engine_estimate

    return engine_estimate(job)


# ---------------------------------------------------------------------------------------------- device


def detect_device() -> str:
    """E.g. ``"CPU (16 threads)"`` or ``"NVIDIA GeForce RTX 4090, 24.0 GB"``: what the status bar shows."""
    with _IMPORT_LOCK:  # torch only, not the whole engine: this runs at start-up
        from studio.engine.devices import describe_device

    return describe_device()


def detect_device_type() -> str:
    """"cpu", "cuda" or "mps": what training.device = 'auto' picks on this machine."""
    with _IMPORT_LOCK:
        from studio.engine.devices import pick_device

    return pick_device("auto").type


# ------------------------------------------------------------------------------------------- try/export


class ModelCache:
    """The base model for Try & Export, loaded once per path (only used from one worker thread at a time)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._bundle: Any = None
        self._lock = threading.Lock()

    def _load(self, model: ModelSection) -> Any:
        from studio.engine.checkpoint import load_model

        key = (model.path, model.family, model.prediction_type, model.vae, model.config_dir)
        if self._key != key:
            self._bundle = None  # free the old one first: two models may not fit in memory
            self._bundle = load_model(model)
            self._key = key
        return self._bundle

    @contextlib.contextmanager
    def exclusive(self, model: ModelSection) -> Iterator[Any]:
        """The loaded model, held by one task at a time (generating and exporting both switch adapters on it)."""
        with self._lock:
            yield self._load(model)

    def clear(self) -> None:
        """Load afresh next time; never waits for a task using the model (called from the GUI thread)."""
        self._key = None


def generate_pair(cache: ModelCache, model: ModelSection, lora_path: Path, prompt: str, *, negative_prompt: str,
                  seed: int, steps: int, guidance: float, strength: float, size: int | None) -> tuple[Any, Any]:
    """Base and LoRA images at the same seed, for side-by-side comparison."""
    from studio.engine.sampling import generate

    kw = dict(negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=size, height=size)
    with cache.exclusive(model) as bundle:
        base = generate(bundle, prompt, **kw)
        with_lora = generate(bundle, prompt, lora_path=lora_path, lora_scale=strength, **kw)
    return base, with_lora


def generate_with_lora(cache: ModelCache, model: ModelSection, lora_path: Path, prompt: str, *, negative_prompt: str,
                       seed: int, steps: int, guidance: float, strength: float, size: int | None) -> Any:
    """Only the LoRA picture (a new strength: the base picture at the same seed has not changed)."""
    from studio.engine.sampling import generate

    with cache.exclusive(model) as bundle:
        return generate(bundle, prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
                        width=size, height=size, lora_path=lora_path, lora_scale=strength)


def run_loras(run_dir: Path) -> list[Path]:
    """The LoRA files a run folder holds: the final one first, then intermediate ones, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    # "-diffusers" copies are PEFT layout for diffusers only; they are not what people export from here.
    files = [p for p in run_dir.glob("*.safetensors") if p.is_file() and not p.stem.endswith("-diffusers")]
    final = [p for p in files if "-step" not in p.stem]
    steps = sorted((p for p in files if "-step" in p.stem), key=lambda p: p.stem, reverse=True)
    return sorted(final) + steps


def describe_lora(path: Path) -> dict:
    """What a LoRA file is: rank, alpha, steps, family, title, trigger phrase, metadata."""
    from studio.engine.export import describe_lora as engine_describe
    from studio.engine.inspection import file_report

    info = engine_describe(path)
    # The export report: per consumer whether the file loads fully (and any refusal of its modules).
    return {**info, **file_report(Path(path), info)}


# ------------------------------------------------------------------------------------------------ export


def export_lora_file(src: Path, dst: Path, *, title: str, trigger_words: list[str], description: str) -> Path:
    """The A1111/ComfyUI file: the run's kohya-layout LoRA copied with the given metadata."""
    from studio.engine.relabel import relabel_lora

    return relabel_lora(src, dst, title=title, trigger_words=trigger_words, description=description)


def export_diffusers(cache: ModelCache, model: ModelSection, src: Path, out_dir: Path, *, title: str,
                     trigger_words: list[str], description: str) -> Path:
    """A diffusers-layout folder (``pytorch_lora_weights.safetensors``); needs the base model to map the keys."""
    from studio.engine.relabel import lora_file_to_diffusers

    with cache.exclusive(model) as bundle:
        return lora_file_to_diffusers(bundle, src, out_dir, title=title, trigger_words=trigger_words,
                                      description=description)


def export_merged(model: ModelSection, src: Path, dst: Path, strength: float,
                  progress: Callable[[Any], None] | None = None) -> Path:
    """A full fp16 checkpoint with the LoRA baked in at ``strength`` (for tools without LoRA support)."""
    from studio.engine.merge import merge_lora_into_checkpoint

    return Path(merge_lora_into_checkpoint(model, src, strength, dst, progress=progress)["path"])


def find_unfinished_runs(job: Job) -> list:
    """Unfinished runs (a checkpoint, no final LoRA) next to the job's run folder: the window offers to resume them."""
    from studio.engine.runs import find_unfinished_runs as find

    if not job.output.dir.strip():
        return []
    out = Path(job.output.dir).expanduser()
    found = find(out.parent) if out.parent != out else []
    return [run for run in found if run.run_dir == out or run.run_dir.name.startswith(out.name)]


# ------------------------------------------------------------------------------------------------ LoRA tools


def resize_lora(src: Path, dst: Path, *, rank: int | None, fraction: float | None) -> Any:
    """SVD resize of a kohya-layout LoRA (studio.engine.lora_tools)."""
    from studio.engine.lora_tools import resize_lora as engine_resize

    return engine_resize(src, dst, rank=rank, fraction=fraction)


def merge_loras(sources: list[tuple[Path, float]], dst: Path) -> dict:
    """Several LoRAs into one at their strengths (studio.engine.lora_tools)."""
    from studio.engine.lora_tools import merge_loras as engine_merge

    return engine_merge(sources, dst)
