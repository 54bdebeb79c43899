"""Part files kept beside a transformer-only model (CLIP-L, CLIP-G, T5-XXL, VAE), shared by FLUX.1 and SD3.

Where people keep them (beside the model, Stability's ``text_encoders/`` folder, ComfyUI's and A1111/Forge's model
folders), what a file holds told by its keys and shapes (never its name: names only decide which files are read
first), and the sentence for a wrong or a missing part, naming the file and the job field.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from studio.engine.jsonfile import JsonFileError, read_json_object
from studio.engine.safe_load import ModelLoadError, open_weights

# Where ComfyUI / A1111-Forge keep parts, relative to a "models" folder.
PART_FOLDERS = {
    "denoiser": ("unet", "diffusion_models", "Stable-diffusion", "checkpoints"),
    "text_encoder": ("text_encoders", "clip", "text_encoder"),
    "vae": ("vae", "VAE"),
}
# Folders beside the model file that hold its own parts (Stability's and BFL's repositories: text_encoders/, vae/).
BESIDE = ("text_encoders", "text_encoder", "clip", "vae")
WEIGHT_SUFFIXES = (".safetensors", ".sft")

_CLIP_MARK = "encoder.layers.0.self_attn.q_proj.weight"
_T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
_VAE_MARK = "encoder.conv_out.weight"
_OPEN_CLIP_MARK = "transformer.resblocks.0.attn.in_proj_weight"
# Names people know the full-size encoders by, from (width, layers).
_KNOWN = {("clip", 768, 12): "CLIP-L", ("clip", 1280, 32): "CLIP-G (OpenCLIP bigG)", ("clip", 1024, 23): "OpenCLIP-H",
          ("t5", 4096, 24): "T5-XXL"}


@dataclass(frozen=True)
class Holding:
    """What a part file holds, from its keys and shapes: a CLIP or T5 text encoder (width, layers, MLP width) or a
    VAE (width = latent channels); ``prefix`` is the key prefix before the transformers/VAE names."""

    kind: str  # "clip" | "t5" | "vae" ("openclip": a layout that is described, never accepted)
    width: int
    layers: int = 0
    mlp: int = 0
    prefix: str = ""

    def describe(self) -> str:
        if self.kind == "vae":
            return f"a VAE with {self.width} latent channels"
        if self.kind == "openclip":
            return (f"an OpenCLIP-layout text encoder (width {self.width}, {self.layers} layers: transformer.resblocks…), "
                    "which LoRA Studio reads only in the transformers layout (text_model.encoder.layers…, as "
                    "Stability's and ComfyUI's clip_g.safetensors)")
        known = _KNOWN.get((self.kind, self.width, self.layers))
        what = "CLIP" if self.kind == "clip" else "T5"
        return (f"a {known or what} text encoder (width {self.width}, {self.layers} layers, MLP {self.mlp})")


def holding(shapes: Mapping[str, tuple[int, ...]]) -> Holding | None:
    """The part a file of one text encoder or one VAE holds, else None (a full model is not a part: see ``check``)."""
    keys = list(shapes)
    for mark, kind in ((_T5_MARK, "t5"), (_CLIP_MARK, "clip")):
        key = next((k for k in keys if k.endswith(mark)), None)
        if key is None:
            continue
        base = key[: -len(mark)]  # "<prefix>" or "<prefix>text_model."
        prefix = base.removesuffix("text_model.")
        if kind == "t5":
            width = shapes[key][1]
            block = base + "encoder.block."
            ff = block + "0.layer.1.DenseReluDense."
            mlp = next((shapes[ff + k][0] for k in ("wi_0.weight", "wi.weight") if ff + k in shapes), 0)
        else:
            width = shapes[key][0]
            block = base + "encoder.layers."
            mlp = shapes.get(block + "0.mlp.fc1.weight", (0,))[0]
        layers = len({k[len(block):].split(".", 1)[0] for k in keys if k.startswith(block)})
        return Holding(kind, int(width), layers, int(mlp), prefix)
    key = next((k for k in keys if k.endswith(_OPEN_CLIP_MARK)), None)
    if key is not None:  # OpenCLIP's own layout (in_proj_weight = q, k, v stacked)
        block = key[: -len(_OPEN_CLIP_MARK)] + "transformer.resblocks."
        layers = len({k[len(block):].split(".", 1)[0] for k in keys if k.startswith(block)})
        return Holding("openclip", int(shapes[key][1]), layers, prefix=key[: -len(_OPEN_CLIP_MARK)])
    key = next((k for k in keys if k.endswith(_VAE_MARK) and len(shapes[k]) == 4), None)
    if key is not None:
        # The encoder's last conv gives mean and log-variance: 2 x 16 channels for Flux's and SD3's VAE (SD's: 2 x 4).
        return Holding("vae", int(shapes[key][0]) // 2, prefix=key[: -len(_VAE_MARK)])
    return None


@dataclass(frozen=True)
class PartSpec:
    """One part a model file may lack: its job field (``model.<name>``), label, and the shapes it must have."""

    name: str  # the component and job field: text_encoder, text_encoder_2, text_encoder_3, vae
    label: str  # the family's Part label, for people
    kind: str  # "clip" | "t5" | "vae" ("tokenizer": named in messages only, not a weights file or a job field)
    width: int | None = None
    layers: int | None = None
    mlp: int | None = None
    hints: tuple[str, ...] = ()  # file-name fragments (lower case) read first when searching
    hints_only: bool = False  # only files so named (VAEs of different models share their shapes)
    required: bool = True

    @property
    def field(self) -> str:
        return f"model.{self.name}"

    def accepts(self, found: Holding | None) -> bool:
        return found is not None and found.kind == self.kind and all(
            want is None or want == got for want, got in ((self.width, found.width), (self.layers, found.layers),
                                                          (self.mlp, found.mlp)))

    def wants(self) -> str:
        return Holding(self.kind, self.width or 0, self.layers or 0, self.mlp or 0).describe()


def spec_from_config(name: str, label: str, kind: str, config_dir: Path, **kw: Any) -> PartSpec:
    """A part's spec with the sizes its config (``config_dir/<name>/config.json``) gives, when it has one."""
    try:
        config = read_json_object(Path(config_dir) / name / "config.json")
    except JsonFileError:
        config = {}

    def number(*keys: str) -> int | None:
        value = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
        return int(value) if value is not None else None

    if kind == "clip":
        sizes = {"width": number("hidden_size"), "layers": number("num_hidden_layers"), "mlp": number("intermediate_size")}
    elif kind == "t5":
        sizes = {"width": number("d_model"), "layers": number("num_layers"), "mlp": number("d_ff")}
    else:
        sizes = {"width": number("latent_channels")}
    return PartSpec(name, label, kind, **sizes, **kw)


# ------------------------------------------------------------------------------------------------ finding


def search_folders(path: Path) -> list[Path]:
    """The model's own folder and its part folders, then the ComfyUI/A1111 part folders of the "models" folder above."""
    path = Path(path).expanduser()
    folders = [path.parent, *(path.parent / name for name in BESIDE)]
    for parent in path.parents:
        if parent.name.lower() == "models":
            for names in PART_FOLDERS.values():
                folders += [parent / n for n in names]
            break
    seen: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder not in seen:
            seen.append(folder)
    return seen


def comfyui_t5_tokenizer(path: Path) -> list[Path]:
    """ComfyUI ships T5's tokenizer with its code (``comfy/text_encoders/t5_tokenizer/``, beside its ``models``
    folder): that folder, for a model file kept under a ComfyUI models folder that has it."""
    for parent in Path(path).expanduser().parents:
        if parent.name.lower() == "models":
            folder = parent.parent / "comfy" / "text_encoders" / "t5_tokenizer"
            return [folder] if folder.is_dir() else []
    return []


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    except OSError:
        return []


def _is_part(spec: PartSpec, file: Path) -> bool:
    try:
        check_part(spec, file)
    except Exception:  # another part, a whole model or an unreadable file: the next candidate may be the one
        return False
    return True


def find_part(spec: PartSpec, folders: Iterable[Path], model_file: Path | None = None) -> Path | None:
    """A file in ``folders`` that holds ``spec``'s part, told by its shapes; files whose names hint at the part are
    read first. A VAE-like spec (``hints_only``) takes only files so named, or any in a ``vae`` folder beside the
    model (its own repository's)."""
    own_vae = model_file.parent / "vae" if model_file is not None else None
    named, others = [], []
    for folder in folders:
        for file in _files(folder):
            if model_file is not None and file == model_file:
                continue
            lower = file.name.lower()
            if any(hint in lower for hint in spec.hints) or (spec.hints_only and folder == own_vae):
                named.append(file)
            elif not spec.hints_only:
                others.append(file)
    for file in named + others:
        if _is_part(spec, file):
            return file
    return None


@functools.lru_cache(maxsize=512)
def _read(file: str, mtime_ns: int, size: int) -> tuple[Holding | None, str, str, bool]:
    """(what the file holds, detect's kind, its architecture, scaled fp8) from the header; cached per file version,
    since the Model page asks again on every change and each part reads the same folders."""
    from studio.engine.detect import detect

    w = open_weights(file)
    det = detect(w.shapes, w.metadata, Path(file).name)
    scaled = "scaled_fp8" in w.shapes or any(k.endswith(".scale_weight") for k in w.shapes)
    return holding(w.shapes), det.kind, det.architecture, scaled


def check_part(spec: PartSpec, file: Path) -> Holding:
    """What ``file`` holds when it is ``spec``'s part; otherwise a ModelLoadError naming the file, the field, what the
    file is and what the field needs."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"'{file}' ({spec.field}) does not exist; choose the {spec.label} file, or clear the "
                             "field to find it next to the model")
    stat = file.stat()
    found, kind, architecture, scaled = _read(str(file), stat.st_mtime_ns, stat.st_size)
    if kind in ("checkpoint", "other", "lora", "embedding"):  # a whole model (or a LoRA) is not a part
        what = f"a {architecture} model" if kind in ("checkpoint", "other") else f"a {architecture}"
    elif scaled and spec.accepts(found):
        # ComfyUI's *_fp8_scaled files keep a scale per weight that a plain cast would drop: the encoder would be wrong.
        raise ModelLoadError(f"'{file.name}' ({spec.field}) is a scaled-fp8 file (ComfyUI's *_scaled), which LoRA "
                             f"Studio cannot read yet; choose the fp16 or plain fp8 {spec.label} file (e.g. "
                             "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)")
    elif spec.accepts(found):
        return found  # type: ignore[return-value]
    else:
        what = found.describe() if found is not None else "no text encoder or VAE LoRA Studio recognises"
    raise ModelLoadError(f"'{file.name}' ({spec.field}) holds {what}, not the {spec.label} ({spec.wants()}); "
                         f"choose the {spec.label} file for {spec.field}, or clear the field to find it next to the "
                         "model")


def resolve(specs: Iterable[PartSpec], path: Path, chosen: Mapping[str, str], inside: Mapping[str, bool]
            ) -> dict[str, Path | None]:
    """Each part the model file lacks (or that the job names): the chosen file (checked), else one found nearby,
    else None. Parts the file carries itself and the job does not name are left out."""
    folders = search_folders(path)
    out: dict[str, Path | None] = {}
    for spec in specs:
        value = chosen.get(spec.name) or ""
        if value:
            file = Path(value).expanduser()
            check_part(spec, file)
            out[spec.name] = file
        elif not inside.get(spec.name):
            out[spec.name] = find_part(spec, folders, Path(path).expanduser())
    return out


def missing_message(family_label: str, path: Path, missing: list[PartSpec], example_files: str) -> str:
    fields = " / ".join(spec.field for spec in missing if spec.kind != "tokenizer")
    labels = [spec.label for spec in missing]
    listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
    return (f"'{Path(path).name}' holds the {family_label} transformer without its {listed}. Choose them on the Model page (or set {fields}), or put "
            f"{example_files} next to the model, in a text_encoders/ folder beside it, or in ComfyUI's "
            "models/text_encoders (models/clip) and models/vae folders")


# What a T5 tokenizer folder holds (any one of them): sentencepiece's model or the fast tokenizer's JSON.
T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def find_t5_tokenizer(folders: Iterable[Path], subfolders: tuple[str, ...] = (),
                      hub: tuple[tuple[str, str], ...] = ()) -> Any | None:
    """T5's tokenizer (not bundled: the app ships no copy) from the user's files: the first of ``folders`` (or its
    ``subfolders``, e.g. a diffusers folder's tokenizer_2 / tokenizer_3) holding one, else a model of ``hub``
    (repo id, subfolder) already in the local Hugging Face cache; None when there is none."""
    from transformers import T5TokenizerFast

    from studio.engine.checkpoint import hub_snapshot

    candidates = [c for folder in folders for c in (Path(folder), *(Path(folder) / sub for sub in subfolders))]
    for repo, sub in hub:
        snapshot = hub_snapshot(repo)
        if snapshot is not None:
            candidates.append(snapshot / sub)
    for candidate in candidates:
        if any((candidate / f).is_file() for f in T5_TOKENIZER_FILES):
            try:
                return T5TokenizerFast.from_pretrained(candidate, local_files_only=True)
            except Exception:  # a broken or foreign tokenizer file: the next candidate may be T5's
                continue
    return None
