"""Fixture writers for the checkpoint tests (Lightning-style .ckpt, header-only sparse files, kohya LoRAs) and their checks."""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import struct
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

from studio.engine.ldm import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from studio.paths import resource_path

# ------------------------------------------------------------------------------------------------ Lightning .ckpt


def _np_scalar_stub(*args):  # pragma: no cover - only its pickled name matters
    raise AssertionError("never called")


class _ModelCheckpointStub:  # pragma: no cover - pickled by name only
    pass


class _NumpyScalar:
    """Pickles like numpy 1.x pickled a numpy float: numpy.core.multiarray.scalar(dtype, raw bytes)."""

    def __init__(self, value: float):
        self.value = value

    def __reduce__(self):
        return _np_scalar_stub, (np.dtype("f8"), np.float64(self.value).tobytes())


# Real SD checkpoints were written by Lightning 1.x with numpy 1.x: these are the global names they contain.
_NAMES = {
    id(_np_scalar_stub): ("numpy.core.multiarray", "scalar"),
    id(_ModelCheckpointStub): ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
}


class _LightningPickler(pickle._Pickler):
    """Writes our stand-ins under the module paths Lightning/numpy used (without importing Lightning)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_global(self, obj, name=None):
        if id(obj) in _NAMES:
            module, qualname = _NAMES[id(obj)]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_LightningPickler.dispatch[types.FunctionType] = lambda self, obj: self.save_global(obj)
_LightningPickler.dispatch[type] = lambda self, obj: self.save_global(obj)
_pickle_module = types.ModuleType("lightning_pickle")
_pickle_module.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_pickle_module.Pickler = _LightningPickler


def write_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], *, legacy: bool = False) -> Path:
    """A .ckpt shaped like sd-v1-5.ckpt: state_dict + epoch/global_step + ModelCheckpoint callback + numpy scalars."""
    checkpoint = {
        "epoch": 6,
        "global_step": 840000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {_ModelCheckpointStub: {"monitor": None, "best_model_score": _NumpyScalar(0.1234),
                                             "best_model_path": "/fsx/stable-diffusion/last.ckpt",
                                             "current_score": _NumpyScalar(0.5), "dirpath": "/fsx/ckpts"}},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(checkpoint, path, pickle_module=_pickle_module, _use_new_zipfile_serialization=not legacy)
    return path


def pickle_globals(path: Path) -> set[str]:
    """GLOBAL names in a torch checkpoint's pickle (read with pickletools; nothing is executed)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    else:
        data = path.read_bytes()
    found = set()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
        except Exception:
            break
    return found


def test_lightning_ckpt_fixture_holds_what_real_ones_hold(tmp_path):
    path = write_lightning_ckpt(tmp_path / "x.ckpt", {"a": torch.zeros(2)})
    names = pickle_globals(path)
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in names
    assert {"numpy.core.multiarray.scalar", "numpy.dtype"} <= names


# ------------------------------------------------------------------------------------------------ full-size shapes


def architecture(family: str):
    """Meta-device modules of the real architecture from the bundled configs (no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = resource_path("model_configs", family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))]
        if (cfg / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2")))
    return unet, vae, encoders


def ldm_tensors(family: str, make) -> dict[str, torch.Tensor]:
    """The family's full original-layout state dict with tensors from ``make(diffusers_key, meta_tensor)``."""
    unet, vae, encoders = architecture(family)

    def fill(module):
        return {k: make(k, v) for k, v in module.state_dict().items() if v.is_floating_point()}

    out = unet_to_ldm(fill(unet), unet.config)
    out.update(vae_to_ldm(fill(vae), vae.config))
    if family == "sd1":
        out.update(clip_to_ldm(fill(encoders[0]), "cond_stage_model.transformer."))
    elif family in ("sd2", "sd2-v"):
        out.update(open_clip_to_ldm(fill(encoders[0]), "cond_stage_model.model."))
    else:
        out.update(clip_to_ldm(fill(encoders[0]), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_ldm(fill(encoders[1]), "conditioner.embedders.1.model."))
    return out


def ldm_shapes(family: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ldm_tensors(family, lambda k, v: v).items()}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], *, metadata: dict | None = None,
                             data: dict[str, torch.Tensor] | None = None) -> Path:
    """A valid fp16 safetensors file whose data is a hole (no disk used), except for tensors given in ``data``."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
        for key, tensor in (data or {}).items():
            fh.seek(8 + len(raw) + header[key]["data_offsets"][0])
            fh.write(tensor.to(torch.float16).contiguous().numpy().tobytes())
    return path


def test_sparse_fixture_is_valid_safetensors(tmp_path):
    from safetensors import safe_open

    path = write_sparse_safetensors(tmp_path / "s.safetensors", {"a": (4, 4), "b": (3,)}, metadata={"k": "v"},
                                    data={"b": torch.tensor([1.0, 2.0, 3.0])})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert f.get_tensor("b").tolist() == [1.0, 2.0, 3.0]
        assert f.get_tensor("a").abs().sum() == 0


# ------------------------------------------------------------------------------------------------ kohya LoRAs


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_targets(bundle) -> dict[str, list[str]]:
    """Per component, the module paths a kohya-default LoRA adapts."""
    from studio.engine.lora import components

    out = {}
    for name, model in components(bundle).items():
        targets = UNET_TARGETS if name == "unet" else TE_TARGETS
        out[name] = [n for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith("." + t) for t in targets)]
    return out


def random_kohya_lora(bundle, path: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                      family_meta: str | None = "auto") -> tuple[Path, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """A kohya-layout LoRA with random (non-zero) up and down weights, named by studio.engine.export's rules.

    Returns the file and, per component, module path → (down, up) for building the same LoRA with peft.
    """
    from safetensors.torch import save_file

    from studio.engine.export import kohya_module_name
    from studio.engine.lora import components

    g = torch.Generator().manual_seed(seed)
    tensors, plan = {}, {}
    models = components(bundle)
    for component, paths in lora_targets(bundle).items():
        plan[component] = {}
        model = models[component]
        for module_path in paths:
            weight = model.get_submodule(module_path).weight
            out_features, in_features = weight.shape[0], weight.shape[1]
            spatial = tuple(weight.shape[2:])
            down = torch.randn((rank, in_features, *([1] * len(spatial))), generator=g) * 0.1
            up = torch.randn((out_features, rank, *([1] * len(spatial))), generator=g) * 0.1
            name = kohya_module_name(bundle.family, component, module_path, bundle.denoiser.config)
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            plan[component][module_path] = (down, up)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    if family_meta:
        metadata["ss_base_model_version"] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[
            bundle.family.name if family_meta == "auto" else family_meta]
    save_file(tensors, str(path), metadata=metadata)
    return path, plan


def apply_with_peft(bundle, plan, *, rank: int, alpha: float, strength: float = 1.0) -> None:
    """The reference: the same LoRA injected with peft (scale lora_alpha / r), weights copied in."""
    from peft import LoraConfig, inject_adapter_in_model

    from studio.engine.lora import components

    models = components(bundle)
    for component, modules in plan.items():
        model = models[component]
        config = LoraConfig(r=rank, lora_alpha=alpha * strength, target_modules=list(modules), init_lora_weights=False)
        inject_adapter_in_model(config, model, adapter_name="ref")
        for module_path, (down, up) in modules.items():
            layer = model.get_submodule(module_path)
            with torch.no_grad():
                layer.lora_A["ref"].weight.copy_(down.reshape(layer.lora_A["ref"].weight.shape))
                layer.lora_B["ref"].weight.copy_(up.reshape(layer.lora_B["ref"].weight.shape))
