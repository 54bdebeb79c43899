"""Helpers every family's loader uses: completeness checks, fp16-only folders, the scheduler a config folder names."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from studio.engine.safe_load import ModelLoadError

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def check_complete(module: Any, what: str, name: str) -> None:
    """Weights a file lacks stay on the meta device after loading; say which instead of failing mid-training."""
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"'{name}' is incomplete: {len(missing)} weight(s) of the {what} are missing (e.g. {missing[0]}); "
            "the file may be damaged or a partial model"
        )


def weights_variant(folder: Path, weights: tuple[str, ...]) -> str | None:
    """'fp16' when a component folder only has the half-precision files (common for hub downloads)."""
    if any((folder / w).is_file() for w in weights):
        return None
    if any((folder / w.replace(".", ".fp16.", 1)).is_file() for w in weights):
        return "fp16"
    return None


def configured_prediction(config_dir: Path, known: tuple[str, ...]) -> str | None:
    """The prediction type a config folder's scheduler names, if it is one of ``known``."""
    from studio.engine.jsonfile import JsonFileError
    from studio.engine.model_configs import SCHEDULER_CONFIG, read_config

    try:
        config = read_config(config_dir, SCHEDULER_CONFIG)
    except JsonFileError:
        return None
    value = config.get("prediction_type")
    return value if value in known else None


@contextmanager
def quiet_diffusers():
    """diffusers warns about dtype casts and unused keys (EMA, logit scale) that are expected when loading."""
    from diffusers.utils import logging as diffusers_logging  # importing it resets its level, so import first

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
