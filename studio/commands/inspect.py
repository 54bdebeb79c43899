"""`lora-studio inspect PATH [--json] [--set model.KEY=VALUE]`: what a checkpoint, LoRA file or dataset folder is, in words or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED = 0, 1

COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2", "vae": "VAE"}
DTYPE_LABELS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect", help="describe a checkpoint, a LoRA file or a dataset folder",
        description="Describe a base model (family, prediction type, parameters, hashes), a LoRA file (rank, alpha, "
                    "modules, base family) or a dataset folder (usable images, problems). Nothing is executed "
                    "from the file and nothing is downloaded.",
    )
    p.add_argument("path", help="a .safetensors/.ckpt file, a diffusers folder, a cached hub id, or an image folder")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256/A1111 hashes (they read the whole file)")
    p.add_argument("--load", action="store_true", help="also load the model for real and report the load time")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="a model setting the description should use, as in a job: e.g. --set model.config_dir=DIR for "
                        "a model of unusual size, --set model.text_encoder_3=t5xxl_fp16.safetensors to check a part "
                        "file (repeatable)")
    return p


def _model_section(overrides: list[str]) -> Any:
    """The job's model section from ``--set model.KEY=VALUE`` items (bad ones are a ConfigError naming them)."""
    from studio.engine.config import ConfigError, Job, Problem, apply_overrides, parse_cli_value

    values, problems = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("model."):
            problems.append(Problem("--set", f"'{item}' is not model.KEY=VALUE, e.g. model.config_dir=DIR"))
            continue
        values[key.strip()] = parse_cli_value(value.strip())
    if problems:
        raise ConfigError(problems, "command line")
    job = Job()
    apply_overrides(job, values)
    return job.model


def format_bytes(n: float | None) -> str:
    from studio.engine.devices import format_bytes as _format

    return "—" if n is None else _format(n)


def run(args: argparse.Namespace) -> int:
    from studio.engine.inspection import inspect_path
    from studio.engine.safe_load import ModelLoadError

    from studio.engine.config import ConfigError

    try:
        model = _model_section(args.overrides) if args.overrides else None
        info = inspect_path(args.path, hashes=not args.no_hash, load=args.load, model=model)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # the dataset scanner and LoRA reader have their own errors; all are for people
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        print(describe(info))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ words


def format_params(n: int | None) -> str:
    if not n:
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def _rows(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows if v not in (None, ""))


def describe(info: dict[str, Any]) -> str:
    kind = info.get("kind")
    if kind == "lora":
        return _describe_lora(info)
    if kind == "dataset":
        return _describe_dataset(info)
    return _describe_checkpoint(info)


def _describe_checkpoint(info: dict[str, Any]) -> str:
    what = {"checkpoint": "model", "vae": "VAE", "embedding": "textual-inversion embedding"}.get(info.get("kind"), "file")
    rows: list[tuple[str, Any]] = [("Kind", f"{info.get('architecture') or what} ({info.get('format_label', '')})")]
    if info.get("family"):
        rows.append(("Family", info.get("family_label") or info["family"]))
    if info.get("prediction_type"):
        source = info.get("prediction_source")
        rows.append(("Predicts", info["prediction_type"] + (f" (from {source})" if source else "")))
    if info.get("native_resolution"):
        rows.append(("Resolution", f"{info['native_resolution']} px"))
    rows.append(("Size", format_bytes(info.get("size_bytes"))))
    if info.get("dtype"):
        rows.append(("Precision", DTYPE_LABELS.get(info["dtype"], info["dtype"])))
    components = info.get("components") or {}
    if components:
        parts = [f"{COMPONENT_LABELS.get(c, c)} {format_params(v['parameters'])}" for c, v in components.items()]
        rows.append(("Parameters", f"{format_params(info.get('parameters'))} in all: " + " · ".join(parts)))
    extras = []
    if info.get("has_ema"):
        extras.append("also holds EMA weights (training uses the regular ones)")
    if info.get("kind") == "checkpoint" and info.get("has_vae") is False:
        extras.append("no VAE inside")
    if info.get("zero_terminal_snr"):
        extras.append("zero terminal SNR")
    if extras:
        rows.append(("Notes", "; ".join(extras + list(info.get("notes") or []))))
    elif info.get("notes"):
        rows.append(("Notes", "; ".join(info["notes"])))
    if info.get("parts"):
        # Parts the file lacks (a transformer-only FLUX.1 / SD3.5 file): the file found nearby, or missing.
        rows.append(("Parts", "; ".join(
            f"{p['label']}: " + (Path(p["file"]).name + " (found)" if p["file"] else
                                 "not found" + ("" if p["required"] else ", optional") + f" (model.{p['name']})")
            for p in info["parts"])))
    if info.get("sha256"):
        rows.append(("SHA-256", info["sha256"]))
        rows.append(("A1111 hash", f"{info['a1111_shorthash']} (legacy: {info['a1111_legacy_hash']})"))
    rows.append(("Read in", format_seconds(info.get("read_time_s"))))
    if info.get("load_time_s") is not None:
        rows.append(("Loaded in", f"{format_seconds(info['load_time_s'])} (fp32, CPU; peak memory "
                                  f"{format_bytes(info.get('peak_rss_bytes'))})"))
    verdict = "ready to train on" if info.get("usable") else f"cannot be trained on: {info.get('problem')}"
    lacking = [p for p in info.get("parts") or [] if p["required"] and not p["file"]]
    if info.get("usable") and (lacking or info.get("parts_problem")):
        verdict = ("needs its " + ", ".join(f"{p['label']} (model.{p['name']})" for p in lacking) + " first"
                   if lacking else f"needs other part files: {info['parts_problem']}")
    rows.append(("Status", verdict))
    return f"{info.get('name') or info.get('path')}\n{_rows(rows)}"


def _describe_lora(info: dict[str, Any]) -> str:
    family = info.get("family")
    rows: list[tuple[str, Any]] = [
        ("Kind", f"LoRA ({info.get('network_type', 'lora')}, {info.get('layout', '?')} layout)"),
        ("For", info.get("family_label") or family or "unknown"),
        ("Rank", info.get("rank")),
        ("Alpha", f"{info['alpha']:g}" if isinstance(info.get("alpha"), (int, float)) else info.get("alpha")),
    ]
    modules = info.get("modules") or {}
    if modules:
        labels = {"unet": "UNet", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}
        rows.append(("Modules", f"{info.get('module_count')}: " + " · ".join(f"{labels.get(k, k)} {v}" for k, v in modules.items())))
    rows += [
        ("Title", info.get("title")),
        ("Trigger", info.get("trigger_phrase")),
        ("Steps", info.get("steps")),
        ("Resolution", info.get("resolution")),
        ("Precision", DTYPE_LABELS.get(str(info.get("dtype")), info.get("dtype"))),
        ("Size", format_bytes(info.get("size_bytes"))),
    ]
    if info.get("sha256"):
        rows.append(("SHA-256", info["sha256"]))
        rows.append(("A1111 hash", info.get("a1111_shorthash")))
    text = f"{info.get('name') or info.get('path')}\n{_rows(rows)}"
    if info.get("problem"):
        text += f"\n  Problem: {info['problem']}"
    consumers = info.get("consumers") or []
    if consumers:
        # The export report: which tools load this file fully, and why not where they do not.
        text += "\n  Loads in:\n" + "\n".join(f"    {_consumer_line(c)}" for c in consumers)
    return text


def _consumer_line(c: dict[str, str]) -> str:
    mark = {"loads fully": "✓", "does not load": "✗"}.get(c["status"], "~")
    return f"{mark} {c['consumer']}: {c['status']}" + (f" ({c['reason']})" if c.get("reason") else "")


def _describe_dataset(info: dict[str, Any]) -> str:
    lines = [f"{info.get('path')}", f"  {info.get('summary') or str(info.get('usable')) + ' images usable'}"]
    problems = info.get("problems") or []
    for p in problems[:30]:
        lines.append(f"  {p.get('severity', 'note')}: {p.get('file')}: {p.get('problem')}")
    if len(problems) > 30:
        lines.append(f"  … and {len(problems) - 30} more (use --json for all)")
    return "\n".join(lines)
