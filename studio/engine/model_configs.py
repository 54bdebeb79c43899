"""A diffusers model folder's configuration files, read and checked before diffusers or transformers parse them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.engine.jsonfile import (
    JsonFileError, field_problems, finite_number, int_or_ints, positive_int, positive_ints, read_json_object, strings,
)

INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"
VAE_CONFIG = "vae/config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TEXT_ENCODER_CONFIGS = ("text_encoder/config.json", "text_encoder_2/config.json")

_WHAT = {INDEX: "the model index", UNET_CONFIG: "the UNet configuration", VAE_CONFIG: "the VAE configuration",
         SCHEDULER_CONFIG: "the noise schedule", TEXT_ENCODER_CONFIGS[0]: "the text encoder configuration",
         TEXT_ENCODER_CONFIGS[1]: "the second text encoder configuration"}

_POS = (positive_int, "a whole number above 0")
_POS_OR_LIST = (int_or_ints, "a whole number above 0 or a list of them")
_CHANNELS = (positive_ints, "a list of whole numbers above 0, e.g. [320, 640, 1280, 1280]")
_TYPES = (strings, "a list of block type names")
_NUMBER = (finite_number, "a number")

RULES: dict[str, dict[str, tuple[Any, str]]] = {
    INDEX: {"_class_name": (lambda v: isinstance(v, str), "a pipeline class name")},
    UNET_CONFIG: {
        "block_out_channels": _CHANNELS, "in_channels": _POS, "out_channels": _POS, "sample_size": _POS_OR_LIST,
        "cross_attention_dim": _POS_OR_LIST, "layers_per_block": _POS_OR_LIST, "attention_head_dim": _POS_OR_LIST,
        "norm_num_groups": _POS, "down_block_types": _TYPES, "up_block_types": _TYPES,
    },
    VAE_CONFIG: {
        "block_out_channels": _CHANNELS, "in_channels": _POS, "out_channels": _POS, "latent_channels": _POS,
        "layers_per_block": _POS, "norm_num_groups": _POS, "sample_size": _POS_OR_LIST, "scaling_factor": _NUMBER,
        "down_block_types": _TYPES, "up_block_types": _TYPES,
    },
    SCHEDULER_CONFIG: {
        "num_train_timesteps": _POS, "beta_start": _NUMBER, "beta_end": _NUMBER,
        "prediction_type": (lambda v: v in ("epsilon", "v_prediction", "sample"), "'epsilon' or 'v_prediction'"),
    },
    **{name: {"hidden_size": _POS, "intermediate_size": _POS, "num_hidden_layers": _POS, "num_attention_heads": _POS,
              "max_position_embeddings": _POS, "vocab_size": _POS, "projection_dim": _POS}
       for name in TEXT_ENCODER_CONFIGS},
}


@dataclass
class FolderConfigs:
    """The parsed configs of one folder (those present) and every problem found in them."""

    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.configs.get(name)


def read_config(folder: Path, name: str) -> dict[str, Any]:
    """One config file of ``folder`` (e.g. UNET_CONFIG), read safely and checked; raises JsonFileError."""
    path = Path(folder) / name
    config = read_json_object(path, what=_WHAT.get(name, ""))
    problems = _value_problems(config, name, path)
    if problems:
        raise JsonFileError("; ".join(problems))
    return config


def read_folder_configs(folder: Path, names: tuple[str, ...] | None = None) -> FolderConfigs:
    """Every config file of a diffusers folder that exists (or ``names``), with all problems at once."""
    folder = Path(folder)
    out = FolderConfigs()
    for name in names or (INDEX, UNET_CONFIG, VAE_CONFIG, SCHEDULER_CONFIG, *TEXT_ENCODER_CONFIGS):
        path = folder / name
        if not path.exists():
            continue
        try:
            config = read_json_object(path, what=_WHAT.get(name, ""))
        except JsonFileError as exc:
            out.problems.append(str(exc))
            continue
        problems = _value_problems(config, name, path)
        out.problems += problems
        if not problems:
            out.configs[name] = config
    return out


def _value_problems(config: dict[str, Any], name: str, path: Path) -> list[str]:
    problems = field_problems(config, RULES.get(name, {}), f"'{path}'")
    if name == UNET_CONFIG and not problems:
        channels, down = config.get("block_out_channels"), config.get("down_block_types")
        if channels is not None and down is not None and len(channels) != len(down):
            problems.append(f"'{path}': 'block_out_channels' has {len(channels)} entries but 'down_block_types' has "
                            f"{len(down)}; they must match")
    return problems
