"""Describe a checkpoint, LoRA file or dataset folder: what it is, family, sizes, hashes (for the CLI and the GUI)."""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from studio.engine.config import BUILTIN_DEMO_MODEL, ModelSection
from studio.engine.detect import detect
from studio.engine.families import family_label, family_of_folder, get_family, registered, supported_text
from studio.engine.model_configs import INDEX, SCHEDULER_CONFIG, VAE_CONFIG, read_folder_configs
from studio.engine.safe_load import ModelLoadError, cached_file_hashes, open_weights, read_safetensors_header, sniff_format

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder", "vae": "VAE"}
_METADATA_VALUE_LIMIT = 2000  # kohya's tag frequencies can be megabytes; a description does not need them


def _family_label(family: str | None) -> str | None:
    return family_label(family)


def _component_prefixes(family: str | None) -> dict[str, tuple[str, ...]]:
    """Component → key prefixes of a single file: its family's, or every family's when it has none."""
    if family is not None:
        return dict(get_family(family).file_component_prefixes())
    merged: dict[str, tuple[str, ...]] = {}
    for f in registered():
        for component, prefixes in f.file_component_prefixes().items():
            merged.setdefault(component, prefixes)
    return merged


def _trim(metadata: dict[str, str]) -> dict[str, str]:
    return {k: (v if len(v) <= _METADATA_VALUE_LIMIT else v[:_METADATA_VALUE_LIMIT] + "…") for k, v in metadata.items()}


def _components(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                prefixes_of: dict[str, tuple[str, ...]]) -> dict[str, dict[str, Any]]:
    """Parameters and dominant dtype per component, from names and shapes alone (EMA copies and buffers left out)."""
    counts: dict[str, int] = collections.Counter()
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for key, shape in shapes.items():
        dtype = dtypes.get(key, "")
        if key.startswith("model_ema.") or not (dtype.startswith(("float", "bfloat"))):
            continue
        for component, prefixes in prefixes_of.items():
            if key.startswith(prefixes):
                n = 1
                for d in shape:
                    n *= d
                counts[component] += n
                kinds[component][dtype] += n
                break
    return {c: {"parameters": counts[c], "dtype": kinds[c].most_common(1)[0][0]} for c in prefixes_of if counts[c]}


def _dominant_dtype(components: dict[str, dict[str, Any]]) -> str | None:
    weights: collections.Counter = collections.Counter()
    for info in components.values():
        weights[info["dtype"]] += info["parameters"]
    return weights.most_common(1)[0][0] if weights else None


def _part_files(path: Path, family: str | None, model: ModelSection | None = None
                ) -> tuple[list[dict[str, Any]], str | None]:
    """The parts a model file lacks (its family's ``part_files``: found nearby, or missing), and why they could not be
    looked up (a wrong file named), for the CLI and the Model page."""
    if family is None:
        return [], None
    fam = get_family(family)
    try:
        section = dataclasses.replace(model, path=str(path)) if model is not None else ModelSection(path=str(path))
        found = fam.part_files(path, section)
    except (ModelLoadError, OSError, ValueError) as exc:  # the description stands; the reason goes with it
        return [], str(exc)
    parts = {p.name: p for p in fam.parts()}
    return [{"name": name, "label": parts[name].label if name in parts else name,
             "required": parts[name].required if name in parts else True, "file": str(file) if file else None}
            for name, file in found.items()], None


def _file_info(path: Path, model: ModelSection | None = None) -> dict[str, Any]:
    w = open_weights(path)
    det = detect(w.shapes, w.metadata, path.name, tensor=w.tensor)
    components = _components(w.shapes, w.dtypes, _component_prefixes(det.family))
    problem = det.problem
    if det.kind == "checkpoint" and not problem and not det.standard_size and not (model and model.config_dir):
        problem = (f"the layout is {_family_label(det.family) or det.architecture}'s but the sizes are unusual: "
                   "loading needs model.config_dir pointing to this model's diffusers configs")
    kind = det.kind if det.kind in ("lora", "vae", "embedding") else "checkpoint" if det.kind in ("checkpoint", "other") else "unknown"
    # The Model page asks for missing parts itself (its parts panel); "usable" is about the file alone.
    parts, parts_problem = _part_files(path, det.family if det.kind == "checkpoint" and problem is None else None, model)
    return {
        "kind": kind,
        "path": str(path),
        "name": path.name,
        "format": w.format,
        "format_label": w.format_label,
        "size_bytes": path.stat().st_size,
        "architecture": det.architecture,
        "family": det.family,
        "family_label": _family_label(det.family),
        "prediction_type": det.prediction_type,
        "prediction_source": det.prediction_source or None,
        "native_resolution": det.native_resolution,
        "in_channels": det.in_channels,
        "components": components,
        "parameters": sum(c["parameters"] for c in components.values()),
        "dtype": _dominant_dtype(components) or (collections.Counter(w.dtypes.values()).most_common(1)[0][0] if w.dtypes else None),
        "has_ema": det.has_ema,
        "has_vae": bool(det.components.get("vae")),
        "zero_terminal_snr": det.zero_terminal_snr,
        "tensor_count": len(w.shapes),
        "usable": det.kind == "checkpoint" and problem is None,
        "problem": problem,
        "notes": list(det.notes),
        "parts": parts,
        "parts_problem": parts_problem,
        "metadata": _trim(w.metadata),
    }


def _component_weights(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _folder_info(path: Path) -> dict[str, Any]:
    found = read_folder_configs(path)  # every config checked, so a broken one is reported, not "ready"
    index = found.get(INDEX) or {}
    problem = "; ".join(found.problems) or None
    family = None if problem else family_of_folder(path)  # a broken config's values are not to be trusted
    denoiser_config = None
    if problem:
        pass
    elif family is None:
        problem = f"this is a {index.get('_class_name', 'diffusers')} folder; LoRA Studio trains {supported_text()}"
    else:
        denoiser_config = family.denoiser_config(path)
        problem = family.folder_problem(path)
    prediction = (found.get(SCHEDULER_CONFIG) or {}).get("prediction_type", "epsilon")
    components: dict[str, dict[str, Any]] = {}
    parts = (*family.component_names(), "vae") if family else tuple(k for k in index if (path / k).is_dir())
    for component in parts:
        weights = _component_weights(path / component)
        if weights is None:
            continue
        header = read_safetensors_header(weights)
        kinds: collections.Counter = collections.Counter()
        for t in header.tensors.values():
            if t.dtype.startswith(("float", "bfloat")):
                n = 1
                for d in t.shape:
                    n *= d
                kinds[t.dtype] += n
        if kinds:
            components[component] = {"parameters": sum(kinds.values()), "dtype": kinds.most_common(1)[0][0]}
    native = None
    try:
        # The denoiser's latent size times the VAE's downscale: 64 × 8 = 512 for SD1.5, 96 × 8 = 768 for SD2.1-768.
        vae_config = found.get(VAE_CONFIG)
        native = int(denoiser_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        native = family.native_resolution(prediction) if family else None
    family_name = family.name if family else None
    return {
        "kind": "checkpoint",
        "path": str(path),
        "name": path.name,
        "format": "diffusers",
        "format_label": "diffusers folder",
        "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        "architecture": _family_label(family_name) or index.get("_class_name"),
        "family": family_name,
        "family_label": _family_label(family_name),
        "prediction_type": prediction,
        "prediction_source": "the folder's scheduler config",
        "native_resolution": native,
        "in_channels": denoiser_config.get("in_channels") if denoiser_config else None,
        "components": components,
        "parameters": sum(c["parameters"] for c in components.values()),
        "dtype": _dominant_dtype(components),
        "has_ema": False,
        "has_vae": (path / "vae").is_dir(),
        "usable": problem is None,
        "problem": problem,
        "notes": [],
        "metadata": {},
    }


def _resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    from studio.engine.checkpoint import demo_model_path, hub_snapshot

    text = str(path)
    if text == BUILTIN_DEMO_MODEL:
        return demo_model_path(), {"builtin": True}
    local = Path(text).expanduser()
    if local.exists():
        return local, {}
    snapshot = hub_snapshot(text)
    if snapshot is not None:
        return snapshot, {"hub_id": text}
    raise ModelLoadError(f"'{text}' does not exist (and is not a model in the local Hugging Face cache)")


def inspect_checkpoint(path: str | os.PathLike, *, hashes: bool = False, load: bool = False,
                       progress: Callable[[str], None] | None = None, model: ModelSection | None = None) -> dict[str, Any]:
    """Describe a base model (single file, diffusers folder, cached hub id) from its header and configs.

    ``hashes`` adds sha256 and A1111's hashes (reads the whole file once; remembered in the user cache).
    ``load`` also loads it for real (fp32, CPU) and reports the load time and the peak memory of this process.
    ``model`` (a job's model settings: config_dir, part files) is what the parts are looked up and loaded with.
    """
    started = time.perf_counter()
    target, extra = _resolve(path)
    if target.is_dir() and (target / "model_index.json").is_file():
        info = _folder_info(target)
    else:
        if target.is_dir():
            from studio.engine.checkpoint import _single_file_in

            target = _single_file_in(target)
        info = _file_info(target, model)
    info.update(extra)
    info["read_time_s"] = time.perf_counter() - started
    if hashes and target.is_file():
        if progress:
            progress("Computing the file's hash")
        info.update(cached_file_hashes(target))
    if load:
        if progress:
            progress("Loading the model")
        info.update(measure_load(str(path), model))
    return info


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    try:
        import resource
    except ImportError:  # Windows: the working-set peak is the equivalent
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def measure_load(model_path: str, model: ModelSection | None = None) -> dict[str, Any]:
    """Load the model as training would (fp32, CPU) and report how long it took."""
    import torch

    from studio.engine.checkpoint import load_model

    section = dataclasses.replace(model, path=model_path) if model is not None else ModelSection(path=model_path)
    bundle = load_model(section, dtype=torch.float32)
    result = {"load_time_s": bundle.load_time_s, "load_dtype": "float32", "peak_rss_bytes": peak_rss_bytes(),
              "loaded_prediction_type": bundle.prediction_type}
    del bundle
    return result


def _looks_like_dataset(folder: Path) -> bool:
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return True
    return False


def inspect_path(path: str | os.PathLike, *, hashes: bool = False, load: bool = False,
                 model: ModelSection | None = None) -> dict[str, Any]:
    """Describe a checkpoint, a LoRA file or a dataset folder; ``result["kind"]`` says which.

    LoRA files are described by studio.engine.export.describe_lora and folders of images by
    studio.engine.dataset.scan_dataset; everything else goes through inspect_checkpoint.
    """
    target, extra = _resolve(path)
    if target.is_dir():
        if (target / "model_index.json").is_file() or not _looks_like_dataset(target):
            return inspect_checkpoint(path, hashes=hashes, load=load, model=model)
        from studio.engine.dataset import scan_dataset

        report = scan_dataset(target)
        return {"kind": "dataset", "path": str(target), "summary": report.summary(), **report.to_json()}
    if target.suffix.lower() in IMAGE_SUFFIXES:
        raise ModelLoadError(f"'{target.name}' is an image; inspect the folder it is in to check a dataset")
    if sniff_format(target) == "safetensors":
        header = read_safetensors_header(target)
        det = detect({k: t.shape for k, t in header.tensors.items()}, header.metadata, target.name)
        if det.kind == "lora":
            return _lora_info(target, hashes)
    info = inspect_checkpoint(path, hashes=hashes, load=load, model=model)
    if info.get("kind") == "lora":
        return _lora_info(target, hashes)
    return info


def _lora_info(path: Path, hashes: bool) -> dict[str, Any]:
    from studio.engine.export import LoraFileError, describe_lora

    try:
        info = describe_lora(path)
    except LoraFileError as exc:
        raise ModelLoadError(str(exc)) from None
    info = {**info, "kind": "lora", "name": path.name}
    info.update(file_report(path, info))
    if "metadata" in info and isinstance(info["metadata"], dict):
        info["metadata"] = _trim(info["metadata"])
    if hashes:
        info.update(cached_file_hashes(path))
    return info


def file_report(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The export report of a LoRA file: per consumer whether it loads fully, and a refusal if its modules are bad."""
    from studio.engine.adapters.consumers import CONSUMERS, report_dicts

    problem = lora_file_problem(path) if info.get("layout") == "kohya" else None
    if problem:
        return {"problem": problem,
                "consumers": [{"consumer": c, "status": "does not load", "reason": problem} for c in CONSUMERS]}
    return {"consumers": report_dicts(info)}


def lora_file_problem(path: Path) -> str | None:
    """Why a kohya/LyCORIS file's modules cannot be applied (unknown algorithm, factors that do not fit), or None."""
    from safetensors import safe_open

    from studio.engine.adapters import AdapterFileError, read_modules

    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        read_modules(tensors)
    except AdapterFileError as exc:
        return str(exc)
    return None
