"""The one diffusers ↔ original (LDM/SGM) name map of SD-style models: the single files A1111, ComfyUI and Forge load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each component's weights live in the original (LDM/SGM) layout (the families name their text encoders'
# exact prefixes: SD1 ``cond_stage_model.transformer.``, SD2 ``cond_stage_model.model.``, SDXL the embedders).
COMPONENT_PREFIXES = {
    "unet": (UNET,),
    "vae": (VAE,),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _cfg(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def unet_prefix_map(config: Any) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames of the first name after the prefix), longest prefix first."""
    per = _cfg(config, "layers_per_block")
    if not isinstance(per, int):
        raise ValueError("UNets with a different number of layers per block have no standard original layout")
    n = len(_cfg(config, "block_out_channels"))
    up_types = _cfg(config, "up_block_types")
    rows: list[tuple[str, str, dict[str, str]]] = [
        ("conv_in.", "input_blocks.0.0.", {}),
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),  # SDXL's size/crop + pooled-text embedding
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(n):
        for j in range(per):
            block = 1 + i * (per + 1) + j
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _UNET_RESNET))
            rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", {}))
    for i in range(n):
        for j in range(per + 1):
            block = i * (per + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", _UNET_RESNET))
            rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
        if i < n - 1:
            # In the original layout the upsampler follows the attention when the block has one.
            slot = 2 if "CrossAttn" in up_types[i] else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (per + 1) + per}.{slot}.conv.", {}))
    return sorted(rows, key=lambda r: -len(r[0]))


def vae_prefix_map(config: Any) -> list[tuple[str, str, dict[str, str]]]:
    n = len(_cfg(config, "block_out_channels"))
    per = _cfg(config, "layers_per_block")
    rows: list[tuple[str, str, dict[str, str]]] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for side in ("encoder", "decoder"):
        rows += [
            (f"{side}.conv_in.", f"{side}.conv_in.", {}),
            (f"{side}.conv_out.", f"{side}.conv_out.", {}),
            (f"{side}.conv_norm_out.", f"{side}.norm_out.", {}),
            (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
            (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
            (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for i in range(n):
        for j in range(per):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        # The decoder's blocks are numbered from the bottom in the original layout.
        for j in range(per + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET))
        rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", {}))
    return sorted(rows, key=lambda r: -len(r[0]))


def _rename(key: str, rows: list[tuple[str, str, dict[str, str]]], what: str) -> str:
    for prefix, target, renames in rows:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return target + rest
    raise ValueError(f"no original-layout name for {what} weight '{key}'")


def unet_module_path(module_path: str, config: Any, rows: list | None = None) -> str:
    """The original-layout path (without ``model.diffusion_model.``) of a diffusers UNet module path."""
    rows = rows or unet_prefix_map(config)
    return _rename(module_path + ".weight", rows, "UNet").removesuffix(".weight")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    rows = unet_prefix_map(config)
    return {UNET + _rename(k, rows, "UNet"): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    rows = vae_prefix_map(config)
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, rows, "VAE")
        # The original VAE's attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE + new] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text model (SD1, SDXL's first encoder): the Hugging Face names under ``prefix``."""
    out = {}
    positions = None
    for key, value in state_dict.items():
        if key == "text_projection.weight" or key.endswith("position_ids"):
            continue  # no projection in these checkpoints; position ids are written below
        # transformers >= 5.6 dropped "text_model." from CLIPTextModel's names; checkpoints keep it.
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = value
        if name == "text_model.embeddings.position_embedding.weight":
            positions = value.shape[0]
    if positions:
        # Older loaders (A1111's SD1 path) expect the position ids buffer in the file.
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text model (SD2, SDXL's second encoder): HF names → OpenCLIP's, q/k/v packed into in_proj."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        if name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name.split(".", 1)[1]] = value
        elif name == "text_projection.weight":
            # OpenCLIP multiplies x @ P; a Linear layer computes x @ W.T, so P = W.T.
            out[prefix + "text_projection"] = value.T.contiguous()
        elif name.startswith("encoder.layers."):
            parts = name.split(".")
            layer, rest = int(parts[2]), ".".join(parts[3:])
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                qkv.setdefault((layer, rest.rsplit(".", 1)[1]), {})[rest.split(".")[1][0]] = value
                continue
            for old, new in _OPENCLIP_LAYER.items():
                if rest.startswith(old + "."):
                    out[f"{prefix}transformer.resblocks.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                raise ValueError(f"no original-layout name for text encoder weight '{key}'")
        else:
            raise ValueError(f"no original-layout name for text encoder weight '{key}'")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {layer} lacks one of q/k/v")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def ldm_state_dict(text_encoder_prefixes: tuple[str, ...], unet: Any, vae: Any, text_encoders: list[Any],
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model in the original layout, e.g. from a ModelBundle's modules. ``dtype`` casts float weights.

    ``text_encoder_prefixes``: where each text encoder goes (the family's ``ldm_text_encoder_prefixes``); a
    prefix ending in ``.transformer.`` is an OpenAI CLIP, one ending in ``.model.`` an OpenCLIP model.
    """
    prefixes = text_encoder_prefixes
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"the model has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    for encoder, prefix in zip(text_encoders, prefixes):
        sd = encoder.state_dict()
        out.update(clip_to_ldm(sd, prefix) if prefix.endswith(".transformer.") else open_clip_to_ldm(sd, prefix))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a .safetensors file atomically (a crash never leaves half a checkpoint under the final name)."""
    from safetensors.torch import save_file

    from studio.engine.fileio import atomic_write_with

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = Path(path)
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))
    return path
