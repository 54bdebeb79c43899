"""LoRA files: trained adapters → kohya/A1111/ComfyUI keys with metadata and hashes; the diffusers layout; reading."""

# Key names are the family's (Family.kohya_name, e.g. families/sd.py explains SD1/SD2/SDXL's and why); every
# consumer scales a module by ``alpha / rank`` exactly like peft's ``lora_alpha / r``, and ``.alpha`` is the
# alpha the module was trained with (conv alpha for LoCon convolutions).
#
# Each module's tensors are its adapter type's (studio/engine/adapters/: LoRA/LoCon lora_down/lora_up/alpha; DoRA
# adds LyCORIS's dora_scale; LoHa hada_*; LoKr lokr_*), so a file holds one algorithm per module and the
# metadata names the module that reads it (networks.lora or lycoris.kohya) with its arguments as that tool writes
# them. Which consumers load a file fully (and where DoRA's formula differs) is adapters/consumers.py's.

from __future__ import annotations

import collections
import datetime as _dt
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from studio.engine import families
from studio.engine.families import Family, get_family
from studio.engine.fileio import atomic_write_with
from studio.engine.jsonfile import JsonFileError, parse_json
from studio.engine.adapters import adapter_for, adapter_of_layer
from studio.engine.lora import ADAPTER_NAME, components, lora_layers

if TYPE_CHECKING:  # pragma: no cover
    from studio.engine.families import ModelBundle
    from studio.engine.config import Job

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NETWORK_MODULE = "networks.lora"  # kohya's LoRA module: LoCon convs are networks.lora with conv_dim too


class LoraExportError(RuntimeError):
    """The trained adapters cannot be written in the requested layout; the message says what to do."""


class LoraFileError(ValueError):
    """A file that cannot be read as a LoRA; the message says what the file is."""


class NotALoraError(LoraFileError):
    """A readable safetensors file that holds something other than a LoRA."""


# ------------------------------------------------------------------------------------------------ key names


def kohya_module_name(family: Family | str, component: str, module_path: str, denoiser_config: Any = None) -> str:
    """The kohya LoRA name (key without ``.lora_down.weight`` etc.) of one adapted module (the family's naming)."""
    return get_family(family).kohya_name(component, module_path, denoiser_config)


def kohya_module_names(bundle: "ModelBundle") -> dict[str, list[str]]:
    """Per component, the kohya names of every module that carries the LoRA (module order)."""
    return {
        key: [kohya_module_name(bundle.family, key, name, bundle.denoiser.config) for name in lora_layers(model)]
        for key, model in components(bundle).items() if lora_layers(model)
    }


# ------------------------------------------------------------------------------------------------ tensors


def kohya_export_problem(source: Any) -> str | None:
    """Why the adapters cannot be written in kohya layout, or None; ``source`` is a ModelBundle or a LoraSection.

    Lets validation and the trainer say so before training rather than at export.
    """
    if hasattr(source, "rank") and not hasattr(source, "denoiser"):
        return adapter_for(source).export_problem(source)
    return None


def kohya_state_dict(bundle: "ModelBundle", dtype: torch.dtype = torch.float16, *,
                     dora_target: str = "lycoris") -> dict[str, torch.Tensor]:
    """The trained adapters in kohya/LyCORIS layout: ``<name>.<suffix>`` with each adapter type's suffixes."""
    out: dict[str, torch.Tensor] = {}
    layers = []
    for key, model in components(bundle).items():
        for path, layer in lora_layers(model).items():
            adapter = adapter_of_layer(layer)
            if adapter.name in ("lora", "locon"):
                # Plain LoRA modules go through the family, which names them and joins those its original model
                # fuses (Flux's and SD3's q/k/v); the adapter checks what the layout cannot hold (rsLoRA …).
                try:
                    adapter.export_tensors(layer, dtype)
                except ValueError as exc:
                    raise LoraExportError(str(exc)) from None
                layers.append((key, path, layer.lora_A[ADAPTER_NAME].weight.detach(),
                               layer.lora_B[ADAPTER_NAME].weight.detach(), float(layer.lora_alpha[ADAPTER_NAME])))
                continue
            name = kohya_module_name(bundle.family, key, path, bundle.denoiser.config)
            try:
                if adapter.name == "dora":
                    tensors = adapter.export_tensors(layer, dtype, target=dora_target)
                else:
                    tensors = adapter.export_tensors(layer, dtype)
            except ValueError as exc:
                raise LoraExportError(str(exc)) from None
            if any(f"{name}.{suffix}" in out for suffix in tensors):
                raise LoraExportError(f"{adapter.name} modules cannot be written for {bundle.family.label}'s fused "
                                      f"layers ({name}); train a plain LoRA, or export the diffusers layout")
            for suffix, tensor in tensors.items():
                out[f"{name}.{suffix}"] = tensor
    try:
        joined = bundle.family.kohya_modules(layers, bundle.denoiser.config)
    except ValueError as exc:
        raise LoraExportError(str(exc)) from None
    for name, down, up, alpha in joined:
        out[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        # fp32 scalar, whatever the save dtype: alphas like 0.3 must not be rounded to fp16.
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not out:
        raise LoraExportError("the model carries no LoRA to export (inject_lora was not run)")
    return out


def kohya_keys(bundle: "ModelBundle") -> list[str]:
    """Every key the kohya/LyCORIS export of the bundle's adapters writes (names only: works on meta models)."""
    keys = []
    for key, model in components(bundle).items():
        for path, layer in lora_layers(model).items():
            name = kohya_module_name(bundle.family, key, path, bundle.denoiser.config)
            keys += [f"{name}.{suffix}" for suffix in adapter_of_layer(layer).export_suffixes(layer)]
    return list(dict.fromkeys(keys))  # fused layers (q/k/v → qkv) share their names


def trained_adapter(bundle: "ModelBundle"):
    """The adapter type the bundle carries (the first adapted layer's), or None."""
    for model in components(bundle).values():
        for layer in lora_layers(model).values():
            return adapter_of_layer(layer)
    return None


def kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha: float, weight_shape: torch.Size | tuple) -> torch.Tensor:
    """The weight change a consumer applies for one kohya module at strength 1: ``up @ down * alpha / rank``."""
    rank = down.shape[0]
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return (delta * (alpha / rank)).reshape(weight_shape)


# ------------------------------------------------------------------------------------------------ metadata


def _resolution_pair(resolution: int | tuple[int, int] | list[int] | None, family: Family,
                     prediction_type: str) -> tuple[int, int]:
    if resolution is None:
        return family.native_resolution(prediction_type), family.native_resolution(prediction_type)
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def _timestamp(value: float | _dt.datetime | None) -> float:
    if value is None:
        return _dt.datetime.now().timestamp()
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    return float(value)


def _str_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def build_metadata(
    *,
    job: "Job",
    family: Family | str,
    prediction_type: str,
    steps: int,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    resolution: int | tuple[int, int] | None = None,
    title: str | None = None,
    description: str | None = None,
    trigger_words: list[str] | str | None = None,
    training_started: float | _dt.datetime | None = None,
    training_finished: float | _dt.datetime | None = None,
    num_train_images: int | None = None,
    network_dim: int | None = None,
    network_alpha: float | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and Stability ``modelspec.*`` metadata; every value is a string."""
    from studio import __version__

    family = get_family(family)
    ids = family.metadata_ids(prediction_type)
    lo, tr, ds, out = job.lora, job.training, job.dataset, job.output
    w, h = _resolution_pair(resolution if resolution is not None else ds.resolution, family, prediction_type)
    started = _timestamp(training_started)
    finished = _timestamp(training_finished)
    if trigger_words is None:
        trigger_words = [ds.trigger_word] if ds.trigger_word.strip() else []
    elif isinstance(trigger_words, str):
        trigger_words = [trigger_words] if trigger_words.strip() else []
    title = title or out.title or out.name
    description = description if description is not None else out.description
    # kohya's spelling of a LoCon is networks.lora with conv_dim/conv_alpha; LyCORIS's is lycoris.kohya with algo
    # and its options (values are strings in both).
    adapter = adapter_for(lo)
    network_args = adapter.network_args(lo)
    model_name = Path(job.model.path).name if job.model.path else ""
    # What training did with the settings the family ignores: no offset or SNR weighting, and kohya's "None" for
    # caption length and clip skip (not CLIP's 75-token pieces or a skipped layer).
    unused = {f"training.{name}" for name in family.ignored_training_options}
    used = {"training.noise_offset": 0.0, "training.min_snr_gamma": 0.0, "training.max_token_length": "None",
            "training.clip_skip": "None"}

    def trained(field: str, value: Any) -> Any:
        return used.get(field, value) if field in unused else value

    meta: dict[str, Any] = {
        # kohya sd-scripts (read by A1111's Lora tab, ComfyUI's LoRA info nodes, Civitai)
        "ss_output_name": out.name,
        "ss_network_module": adapter.network_module,
        "ss_network_dim": network_dim if network_dim is not None else lo.rank,
        "ss_network_alpha": float(network_alpha if network_alpha is not None else lo.alpha),
        "ss_network_dropout": float(lo.dropout),
        "ss_base_model_version": ids["ss_base_model_version"],  # the family's ids, e.g. "sd_v1"
        "ss_v2": ids["ss_v2"],
        "ss_sd_model_name": model_name,
        "ss_resolution": f"({w}, {h})",
        "ss_steps": int(steps),
        "ss_max_train_steps": int(tr.steps),
        "ss_tag_frequency": tag_frequency or {},
        "ss_learning_rate": float(tr.lr),
        "ss_unet_lr": float(tr.lr),
        "ss_text_encoder_lr": float(lo.text_encoder_lr) if lo.train_text_encoder else 0.0,
        "ss_network_train_unet_only": "False" if lo.train_text_encoder else "True",
        "ss_lr_scheduler": tr.scheduler,
        "ss_lr_warmup_steps": int(tr.warmup_steps),
        "ss_optimizer": tr.optimizer,
        "ss_batch_size_per_device": int(tr.batch_size),
        "ss_gradient_accumulation_steps": int(tr.gradient_accumulation),
        "ss_total_batch_size": int(tr.batch_size * tr.gradient_accumulation),
        "ss_mixed_precision": tr.mixed_precision,
        "ss_gradient_checkpointing": str(bool(tr.gradient_checkpointing)),
        "ss_seed": int(tr.seed),
        "ss_noise_offset": trained("training.noise_offset", float(tr.noise_offset)),
        "ss_min_snr_gamma": trained("training.min_snr_gamma", float(tr.min_snr_gamma)),
        "ss_max_grad_norm": float(tr.max_grad_norm),
        # kohya writes "None" for its defaults (75 tokens, the last layer); the numbers say the same, explicitly.
        "ss_max_token_length": trained("training.max_token_length", int(tr.max_token_length)),
        "ss_clip_skip": trained("training.clip_skip", int(tr.clip_skip)),
        "ss_caption_dropout_rate": float(ds.caption_dropout),
        "ss_shuffle_caption": str(bool(ds.shuffle_tags)),
        "ss_keep_tokens": int(ds.keep_tokens),
        "ss_flip_aug": str(bool(ds.random_flip)),
        "ss_enable_bucket": str(bool(ds.buckets)),
        "ss_training_started_at": started,
        "ss_training_finished_at": finished,
        "ss_training_comment": description or "",
        # Stability's ModelSpec (modelspec.*), read by ComfyUI, Civitai and A1111's version check
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ids["modelspec.architecture"],
        # kohya's convention: which layout the names follow (SGM for SDXL LoRAs, diffusers for SD1/SD2).
        "modelspec.implementation": ids["modelspec.implementation"],
        "modelspec.title": title,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": _dt.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.prediction_type": ids["modelspec.prediction_type"],
        "modelspec.trigger_phrase": ", ".join(trigger_words),
        "modelspec.implementation_version": f"lora-studio/{__version__}",
    }
    if network_args:
        meta["ss_network_args"] = network_args
    if num_train_images is not None:
        meta["ss_num_train_images"] = int(num_train_images)
    if description:
        meta["modelspec.description"] = description
    return {k: _str_value(v) for k, v in meta.items()}


# ------------------------------------------------------------------------------------------------ writing


_LEGACY_WINDOW = slice(0x100000, 0x110000)  # 64 KiB at 1 MiB, as sd-webui-additional-networks reads it


def _header_length(data: bytes | memoryview) -> int:
    return 8 + int.from_bytes(bytes(data[:8]), "little")


def safetensors_hashes(data: bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a whole safetensors file, as A1111/additional-networks compute them.

    The model hash covers only the bytes after the header, so it does not depend on the metadata.
    """
    view = memoryview(data)
    return hashlib.sha256(view[_header_length(view):]).hexdigest(), hashlib.sha256(view[_LEGACY_WINDOW]).hexdigest()[:8]


def serialize_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """A safetensors file, as chunks to write in order, whose metadata carries its own sshs hashes."""
    import secrets

    from safetensors.torch import save

    # Serialise once with random placeholders of the hashes' lengths, then patch them into the header: the
    # header keeps its size, so no data offset moves, and the tensors are not serialised twice.
    placeholders = {"sshs_model_hash": secrets.token_hex(32), "sshs_legacy_hash": secrets.token_hex(4)}
    raw = save(tensors, metadata={**metadata, **placeholders})
    view = memoryview(raw)
    end = _header_length(view)
    if end > _LEGACY_WINDOW.start:
        # Metadata over 1 MiB: the legacy window would cover the header itself; that hash is optional.
        del placeholders["sshs_legacy_hash"]
        raw = save(tensors, metadata={**metadata, **placeholders})
        view = memoryview(raw)
        end = _header_length(view)
    header = bytearray(view[:end])
    values = {"sshs_model_hash": hashlib.sha256(view[end:]).hexdigest()}
    if "sshs_legacy_hash" in placeholders:
        values["sshs_legacy_hash"] = hashlib.sha256(view[_LEGACY_WINDOW]).hexdigest()[:8]
    for key, value in values.items():
        needle = f'"{placeholders[key]}"'.encode()
        at = header.find(needle)
        if at < 0 or header.find(needle, at + 1) >= 0:  # pragma: no cover - a random token cannot collide
            raise RuntimeError("could not place the file hash in the safetensors header")
        header[at:at + len(needle)] = f'"{value}"'.encode()
    return [bytes(header), view[end:]]


def _write_chunks(path: Path, chunks: list[bytes | memoryview]) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)

    atomic_write_with(path, writer)


def export_lora(
    bundle: "ModelBundle",
    job: "Job",
    path: Path,
    *,
    steps: int,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    dtype: str = "fp16",
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA in kohya layout with metadata, atomically; returns the path.

    Raises LoraExportError for a model without adapters.
    """
    path = Path(path)
    _write_chunks(path, lora_file_chunks(bundle, job, steps=steps, tag_frequency=tag_frequency, dtype=dtype,
                                         extra_metadata=extra_metadata))
    return path


def lora_file_chunks(
    bundle: "ModelBundle",
    job: "Job",
    *,
    steps: int,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    dtype: str = "fp16",
    extra_metadata: dict[str, Any] | None = None,
) -> list[bytes | memoryview]:
    """The bytes of the kohya-layout LoRA file export_lora writes (in memory: a failed write can keep them)."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"unknown save dtype '{dtype}'; choose one of: {', '.join(SAVE_DTYPES)}")
    tensors = kohya_state_dict(bundle, SAVE_DTYPES[dtype], dora_target=getattr(job.lora, "dora_target", "lycoris"))
    ranks = collections.Counter(t.shape[0] for k, t in tensors.items()
                                if k.endswith((".lora_down.weight", ".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b")))
    metadata = build_metadata(
        job=job, family=bundle.family, prediction_type=bundle.prediction_type, steps=steps,
        tag_frequency=tag_frequency, resolution=job.dataset.resolution,
        network_dim=ranks.most_common(1)[0][0] if ranks else job.lora.rank,
    )
    adapter = trained_adapter(bundle)
    if adapter is not None and adapter.name == "dora":
        # Which consumer's formula the magnitudes were written for (the export report reads it).
        metadata["lora_studio.dora_target"] = getattr(job.lora, "dora_target", "lycoris")
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = _str_value(value)
    return serialize_with_hashes(tensors, metadata)


def diffusers_state_dict(bundle: "ModelBundle") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapters in diffusers' ``save_lora_weights`` layout (``unet.…lora_A.weight``) and its adapter metadata."""
    from peft.utils import get_peft_model_state_dict

    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, Any] = {}
    for key, model in components(bundle).items():
        if not lora_layers(model):
            continue
        for name, value in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False).items():
            tensors[f"{key}.{bundle.family.diffusers_lora_key(key, name)}"] = value.detach().to("cpu").contiguous()
        config = model.peft_config[ADAPTER_NAME].to_dict()
        for k, v in config.items():
            adapter_meta[f"{key}.{k}"] = sorted(v) if isinstance(v, set) else v
    if not tensors:
        raise LoraExportError("the model carries no LoRA to export (inject_lora was not run)")
    return tensors, adapter_meta


def export_diffusers_lora(bundle: "ModelBundle", path: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the diffusers/PEFT layout (loads with ``load_lora_weights`` in diffusers only), atomically."""
    path = Path(path)
    _write_chunks(path, diffusers_lora_chunks(bundle, metadata=metadata))
    return path


def diffusers_lora_chunks(bundle: "ModelBundle", *, metadata: dict[str, str] | None = None) -> list[bytes]:
    """The bytes of the diffusers/PEFT-layout file export_diffusers_lora writes."""
    from safetensors.torch import save

    tensors, adapter_meta = diffusers_state_dict(bundle)
    # Same metadata keys as diffusers' own writer, so its loader rebuilds the exact LoraConfig (incl. DoRA).
    header = {**{k: _str_value(v) for k, v in (metadata or {}).items()}, "format": "pt",
              "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True, default=str)}
    return [save(tensors, metadata=header)]


# ------------------------------------------------------------------------------------------------ reading

@functools.cache
def _kohya_weight() -> re.Pattern:
    """kohya-layout weight keys of any registered family: ``lora_unet_…``, ``lora_te1_…`` + lora_down/lora_up."""
    prefixes = "|".join(re.escape(p) for p in sorted(families.kohya_prefixes(), key=len, reverse=True))
    return re.compile(rf"^({prefixes})_(.+?)\.(lora_down\.weight|lora_up\.weight|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b"
                      rf"|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b)$")


@functools.cache
def _peft_weight() -> re.Pattern:
    """diffusers-layout weight keys of any registered family: ``<component>.….lora_A.weight``."""
    names = "|".join(re.escape(n) for n in sorted(families.component_names(), key=len, reverse=True))
    return re.compile(rf"^({names})\.(.+)\.(lora_A|lora_B)\.weight$")


def _short_component(prefix: str, family: Family | None) -> str:
    """The short name a component's modules are counted under: unet (the denoiser), te, te1, te2 …"""
    name = prefix.removeprefix("lora_")
    if name.startswith("text_encoder"):
        name = "te" + name.removeprefix("text_encoder").lstrip("_")
    if name == "te" and family is not None and len(family.text_encoder_names) > 1:
        name = "te1"  # diffusers calls the first of several text encoders plain text_encoder
    return name
_LYCORIS_PARTS = ("oft_blocks", "oft_diag", "a1.weight", "w_norm", ".diff")  # LyCORIS algorithms LoRA Studio lacks


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"'{path}' does not exist or is not a file")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"'{path.name}' is not a .safetensors file; LoRA Studio reads LoRAs only in that format "
                            "(pickle files such as .pt/.ckpt can run code when opened)")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFileError(f"'{path.name}' cannot be read as safetensors ({exc}); the file may be damaged "
                            "or incomplete") from exc


def _classify_keys(keys: list[str], name: str) -> str:
    """'kohya' or 'diffusers'; raises NotALoraError saying what the file looks like otherwise."""
    if any(_kohya_weight().match(k) for k in keys):
        return "kohya"
    if any(_peft_weight().match(k) for k in keys):
        return "diffusers"
    if any(k.endswith(("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight")) for k in keys):
        raise NotALoraError(f"'{name}' holds LoRA weights for a model other than {families.supported_text()} "
                            "(unknown key names)")
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in keys):
        raise NotALoraError(f"'{name}' is a full Stable Diffusion checkpoint, not a LoRA; use it as the base model")
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        raise NotALoraError(f"'{name}' is a diffusers model part (UNet/VAE weights), not a LoRA")
    if any(part in k for k in keys for part in _LYCORIS_PARTS):
        raise NotALoraError(f"'{name}' is a LyCORIS network of an algorithm LoRA Studio cannot read (OFT, GLoRA, "
                            "full or norm); it reads LoRA, LoCon, DoRA, LoHa and LoKr")
    if any(k in ("emb_params", "clip_l", "clip_g", "string_to_param") for k in keys):
        raise NotALoraError(f"'{name}' is a textual-inversion embedding, not a LoRA")
    raise NotALoraError(f"'{name}' is not a LoRA file: it has no lora_down/lora_up (kohya) or lora_A/lora_B "
                        "(diffusers) weights")


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a LoRA file; raises LoraFileError/NotALoraError for anything else."""
    with _open(path) as f:
        keys = list(f.keys())
        _classify_keys(keys, Path(path).name)
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in keys}
    return tensors, metadata


def describe_lora(path: Path) -> dict[str, Any]:
    """What a LoRA file is: layout, network type, rank/alpha, modules per component, family, metadata.

    Reads only the header and the scalar alphas, so it is fast on large files.
    """
    path = Path(path)
    with _open(path) as f:
        keys = list(f.keys())
        layout = _classify_keys(keys, path.name)
        metadata = dict(f.metadata() or {})
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = collections.Counter(str(f.get_slice(k).get_dtype()) for k in keys if not k.endswith(".alpha"))
        alphas = {k[: -len(".alpha")]: float(f.get_tensor(k).float().item()) for k in keys if k.endswith(".alpha")}

    modules: dict[str, dict[str, Any]] = {}
    dora = False
    algorithms: collections.Counter = collections.Counter()
    for key, shape in shapes.items():
        m = _kohya_weight().match(key) if layout == "kohya" else _peft_weight().match(key)
        if m:
            prefix, rest, part = m.groups()
            module = f"{prefix}_{rest}" if layout == "kohya" else f"{prefix}.{rest}"
            entry = modules.setdefault(module, {"component": prefix})
            if part in ("lora_down.weight", "lora_A"):
                entry["rank"] = shape[0]
                # k x k convolutions are LoCon's; 1x1 convs (SD1's proj_in/out) count as plain LoRA like kohya.
                entry["spatial"] = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
            elif part == "hada_w1_b" or part in ("lokr_w1_b", "lokr_w2_b"):
                entry["rank"] = shape[0]
            if part.startswith("hada_"):
                entry["algorithm"] = "loha"
            elif part.startswith("lokr_"):
                entry["algorithm"] = "lokr"
        elif key.endswith(("dora_scale", "lora_magnitude_vector")):
            dora = True
    for entry in modules.values():
        algorithms[entry.get("algorithm", "lora")] += 1

    family, prediction, family_source = families.lora_family(metadata, shapes, layout)
    counts: dict[str, int] = collections.Counter()
    for entry in modules.values():
        counts[_short_component(entry["component"], family)] += 1

    linear = [e for e in modules.values() if not e.get("spatial")]
    spatial = [e for e in modules.values() if e.get("spatial")]
    ranks = collections.Counter(e["rank"] for e in linear if "rank" in e)
    conv_ranks = collections.Counter(e["rank"] for e in spatial if "rank" in e)
    alpha_values: collections.Counter = collections.Counter()
    conv_alpha_values: collections.Counter = collections.Counter()
    if layout == "kohya":
        for module, entry in modules.items():
            if module in alphas:
                (conv_alpha_values if entry.get("spatial") else alpha_values)[alphas[module]] += 1
    else:
        try:  # text from the file: bounded and named like every JSON read (studio.engine.jsonfile)
            adapter = parse_json(metadata.get("lora_adapter_metadata", "{}") or "{}", f"the adapter metadata of '{path.name}'")
        except JsonFileError as exc:
            raise LoraFileError(str(exc)) from None
        adapter = adapter if isinstance(adapter, dict) else {}
        if "unet.lora_alpha" in adapter:
            alpha_values[float(adapter["unet.lora_alpha"])] += 1
            patterns = adapter.get("unet.alpha_pattern") or {}
            for value in patterns.values():
                conv_alpha_values[float(value)] += 1
        dora = dora or bool(adapter.get("unet.use_dora"))

    rank = ranks.most_common(1)[0][0] if ranks else (conv_ranks.most_common(1)[0][0] if conv_ranks else None)
    alpha = alpha_values.most_common(1)[0][0] if alpha_values else None
    if alpha is None and layout == "kohya" and rank is not None and not alphas:
        alpha = float(rank)  # kohya's convention for files without .alpha: no scaling
    tucker = any(k.endswith((".lora_mid.weight", ".hada_t1", ".lokr_t2")) for k in keys)
    lycoris = [a for a in algorithms if a in ("loha", "lokr")]
    network_type = lycoris[0] if lycoris else ("dora" if dora else ("locon" if spatial else "lora"))
    info: dict[str, Any] = {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "layout": layout,
        "network_type": network_type,
        "rank": rank,
        "alpha": alpha,
        "ranks": sorted(set(ranks) | set(conv_ranks)),
        "module_count": len(modules),
        # The denoiser first, then the text encoders in order.
        "modules": dict(sorted(counts.items(), key=lambda kv: (kv[0].startswith("te"), kv[0]))),
        "family": family.name if family else None,
        "family_label": family.label if family else None,
        "family_short_label": family.short_label if family else None,
        "family_source": family_source,
        "prediction_type": prediction,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "title": metadata.get("modelspec.title") or metadata.get("ss_output_name"),
        "trigger_phrase": metadata.get("modelspec.trigger_phrase") or None,
        "steps": int(metadata["ss_steps"]) if metadata.get("ss_steps", "").isdigit() else None,
        "resolution": metadata.get("modelspec.resolution"),
        "metadata": metadata,
        "tucker": tucker,
    }
    if spatial:
        info["conv_rank"] = conv_ranks.most_common(1)[0][0] if conv_ranks else None
        info["conv_alpha"] = conv_alpha_values.most_common(1)[0][0] if conv_alpha_values else alpha
    return info
