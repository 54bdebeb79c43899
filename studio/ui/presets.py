"""Presets: partial job TOML files (built-in ones in resources/presets, the user's in the data folder)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from studio.engine import config
from studio.engine.config import Job
from studio.engine.fileio import atomic_write_text
from studio.paths import resource_path, user_data_dir

BUILTIN_ORDER = ("quick-test", "balanced", "high-quality")
# What a preset is about: how to train, not what on (paths, names and captions stay with the job).
EXCLUDED = {"model.path", "model.vae", "model.text_encoder", "model.text_encoder_2", "model.text_encoder_3", "model.config_dir", "dataset.path", "dataset.trigger_word", "dataset.repeats",
            "dataset.caption_extension", "output.dir", "output.name", "output.title", "output.description",
            "sampling.prompts"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    values: dict[str, Any]  # dotted field path → value
    path: Path
    builtin: bool


def user_presets_dir() -> Path:
    return user_data_dir() / "presets"


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` → ``{"lora.rank": 8}`` (tables inside a section, like repeats, stay values)."""
    out: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise config.ConfigError([config.Problem(section, "must be a table ([section]) of settings")], source)
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def load_preset(path: Path, builtin: bool = False) -> Preset:
    """Read a preset; raises config.ConfigError when it names unknown settings or bad values."""
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    data.pop("schema_version", None)
    values = _flatten(data, str(path))
    config.apply_overrides(Job(), values)  # checks every key and value, reporting all problems at once
    first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
    name, _, description = first.partition(":")
    if not description:
        name, description = path.stem.replace("-", " ").capitalize(), first
    description = description.strip()
    return Preset(name.strip(), description[:1].upper() + description[1:], values, path, builtin)


def builtin_presets() -> list[Preset]:
    folder = resource_path("presets")
    files = sorted(folder.glob("*.toml"), key=lambda p: (p.stem not in BUILTIN_ORDER,
                                                        BUILTIN_ORDER.index(p.stem) if p.stem in BUILTIN_ORDER else 0,
                                                        p.stem))
    return [load_preset(p, builtin=True) for p in files] + family_presets()


def family_presets() -> list[Preset]:
    """One preset per registered family: its native resolution, preview sampler and the family's own starting
    values (Family.job_defaults), after the general presets."""
    from studio.engine.families import registered

    out = []
    for family in registered():
        values = family.job_defaults()
        config.apply_overrides(Job(), values)  # a family's defaults must be valid settings
        described = ", ".join(f"{'preview ' if path.startswith('sampling.') else ''}"
                              f"{path.split('.')[-1].replace('_', ' ')} {value}" for path, value in values.items())
        out.append(Preset(f"{family.short_label} defaults", f"Starting point for {family.label}: {described}.",
                          values, family.bundled_config_dir(), builtin=True))
    return out


def user_presets() -> list[Preset]:
    """The user's presets; a broken file is skipped rather than taking the list down with it."""
    out = []
    for p in sorted(user_presets_dir().glob("*.toml")):
        try:
            out.append(load_preset(p))
        except (config.ConfigError, tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            continue
    return out


def preset_values(job: Job) -> dict[str, Any]:
    return {info.path: config.get_value(job, info.path) for info in config.iter_fields() if info.path not in EXCLUDED}


def save_user_preset(name: str, job: Job, description: str = "") -> Path:
    slug = re.sub(r"[^\w\-]+", "-", name.strip()).strip("-").lower() or "preset"
    nested: dict[str, dict[str, Any]] = {}
    for path, value in preset_values(job).items():
        section, key = path.split(".", 1)
        nested.setdefault(section, {})[key] = value
    header = f"# {name.strip()}: {description.strip() or 'saved from LoRA Studio'}\n"
    target = user_presets_dir() / f"{slug}.toml"
    atomic_write_text(target, header + tomli_w.dumps(nested))
    return target


def delete_user_preset(preset: Preset) -> None:
    if not preset.builtin:
        preset.path.unlink(missing_ok=True)
