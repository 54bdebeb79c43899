"""SD3's two naming schemes: diffusers' SD3Transformer2DModel paths ↔ Stability's MMDiT names (kohya's LoRA keys).

kohya's ``networks/lora_sd3.py`` trains the Stability MMDiT (``joint_blocks.N.{x_block,context_block}``), so
every kohya SD3 LoRA names its modules there, with q, k and v as one fused ``attn.qkv`` layer; ComfyUI maps
``lora_unet_<MMDiT path with _>`` straight onto the same model. diffusers splits that layer into ``to_q/to_k/to_v``
(image stream) and ``add_q_proj/add_k_proj/add_v_proj`` (text stream). The rows below are the correspondence
diffusers' own single-file converter uses (``convert_sd3_transformer_checkpoint_to_diffusers``), read the other
way. Kept import-light (torch only inside the whole-model conversion).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch

# diffusers path inside transformer_blocks.N → (MMDiT path inside joint_blocks.N, part index in a fused qkv)
_BLOCK_ROWS: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_add_out": ("context_block.attn.proj", None),
    # SD3.5 Medium's second (image-only) self-attention in its first 13 blocks (MMDiT-X).
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
    # q/k RMS norms (SD3.5); no LoRA targets them, the whole-model conversion below needs them.
    "attn.norm_q": ("x_block.attn.ln_q", None),
    "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None),
    "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn2.norm_q": ("x_block.attn2.ln_q", None),
    "attn2.norm_k": ("x_block.attn2.ln_k", None),
}
# Outside the blocks (kohya trains these only when asked, via emb_dims; ComfyUI maps them like any layer).
_OUTER_ROWS: dict[str, str] = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def mmdit_path(module_path: str) -> tuple[str, int | None]:
    """(MMDiT module path, index of this module's rows in a fused qkv or None) of a diffusers module path."""
    match = _BLOCK.match(module_path)
    if match:
        index, rest = match.groups()
        try:
            target, part = _BLOCK_ROWS[rest]
        except KeyError:
            raise ValueError(f"SD3 transformer module '{module_path}' has no MMDiT counterpart") from None
        return f"joint_blocks.{index}.{target}", part
    if module_path in _OUTER_ROWS:
        return _OUTER_ROWS[module_path], None
    raise ValueError(f"SD3 transformer module '{module_path}' has no MMDiT counterpart")


def swaps_scale_shift(module_path: str, num_layers: int) -> bool:
    """Whether the module's output halves are (scale, shift) in diffusers but (shift, scale) in the MMDiT.

    diffusers' AdaLayerNormContinuous (the last block's text-stream modulation and the final layer's) splits its
    output the other way round from Stability's code, so its converter swaps the halves of those weights.
    """
    return module_path in (f"transformer_blocks.{num_layers - 1}.norm1_context.linear", "norm_out.linear")


def mmdit_state_dict(state_dict: Mapping[str, "torch.Tensor"], num_layers: int) -> dict[str, "torch.Tensor"]:
    """A diffusers SD3 transformer's weights in Stability's MMDiT layout (q/k/v joined, modulation halves swapped
    back): the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    import torch

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        module, _, leaf = key.rpartition(".")
        target, part = mmdit_path(module)
        if swaps_scale_shift(module, num_layers):
            half = value.shape[0] // 2
            value = torch.cat([value[half:], value[:half]])
        if part is None:
            out[f"{target}.{leaf}"] = value
        else:
            fused.setdefault(f"{target}.{leaf}", {})[part] = value
    for key, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"'{key}': the model lacks one of q, k, v")
        out[key] = torch.cat([parts[0], parts[1], parts[2]])
    return out
