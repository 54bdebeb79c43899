"""The GPU suite (issue 17 §3): SD1.5-512 and SDXL-1024, full-size random weights, ours vs diffusers' scripts, < 8 min.

``python -m benchmarks.run --suite gpu`` (``benchmarks/gpu_suite.sh`` sets up a bare device machine and calls it)
measures, on one GPU, SD1.5 at 512 px (batch 1 and 8) and SDXL at 1024 px (batch 1 and 4), each eager and
compiled, with and without gradient checkpointing: images/s, counted FLOPs per step, MFU against the device's
dense bf16 peak (``DENSE_BF16_TFLOPS``, by device name), and peak VRAM allocated/reserved; and diffusers' reference
scripts on the same GPU, model and images. Runs go in priority order (every configuration eager first, then the
peers, then checkpointing, then compile) and a run that would end past ``--budget-s`` is skipped and listed as
such, so the suite always finishes inside its time. ``--dry-run`` walks the same path on the tiny model on a CPU
(the test suite runs it); it does not run the compiled rows (minutes of CPU compile for nothing learned) but checks
that their settings make valid GPU jobs. Compiled rows: the repeated blocks, the whole denoiser, and the whole
denoiser as CUDA graphs (batch 1 only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; first match on the name wins,
# so the more specific names come first. MFU = counted FLOPs per second / this.
DENSE_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 6000 Ada", 364.2),
    ("A6000", 154.8),
]

# (name, model preset, resolution, batch sizes): the four configurations.
CONFIGS = [("sd15-512", "sd1", 512, (1, 8)), ("sdxl-1024", "sdxl", 1024, (1, 4))]
DRY_CONFIGS = [("tiny-a", "tiny", 64, (1,)), ("tiny-b", "tiny", 64, (2,))]
# (label, gradient checkpointing, compile scope or None, CUDA graphs, only these (config, batch) or None), in the
# order they are run. CUDA graphs go first among the compiled rows and at batch 1 only: launch overhead is what
# they remove, and batch 1 is where it shows (the SD1.5 batch-1 target is a step rate).
VARIANTS = [
    ("eager", False, None, False, None),
    ("eager + checkpointing", True, None, False, None),
    ("CUDA graphs (whole denoiser)", False, "denoiser", True, {("sd15-512", 1), ("sdxl-1024", 1), ("tiny-a", 1)}),
    ("compiled (blocks)", False, "blocks", False, None),
    ("compiled (whole denoiser)", False, "denoiser", False, None),
    ("compiled (blocks) + checkpointing", True, "blocks", False, None),
]
# Ours trains the peers' LoRA (rank 4 on the attention projections), so every row does the same math.
GPU_SETTINGS: dict[str, Any] = {"lora.rank": 4, "lora.alpha": 4.0, "lora.targets": "attention"}
DEFAULT_BUDGET_S = 390.0  # of the 8 minutes: the wrapper's set-up (wheels, ~20 s) and the report stay outside
FIRST_RUN_GUESS_S = {"sd1": 45.0, "sdxl": 75.0, "tiny": 20.0}  # before a model's first run is timed
COMPILE_EXTRA_S = {"sd1": 60.0, "sdxl": 120.0, "tiny": 60.0}  # a cold regional compile, on top


def dense_bf16_peak(device_name: str | None) -> float | None:
    """The datasheet's dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), or None if unknown."""
    if not device_name:
        return None
    for key, tflops in DENSE_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def _counted_flops(cache: dict, model_dir: Path, resolution: int, checkpointing: bool) -> dict[str, Any]:
    """FLOPs of one LoRA step at batch 1 (counted once per model and checkpointing mode; they scale with batch)."""
    key = (str(model_dir), resolution, checkpointing)
    if key not in cache:
        from benchmarks.flops import count_step
        from benchmarks.measure import RunSpec, build_job
        from benchmarks.run import BASE_SETTINGS

        job = build_job(RunSpec(str(model_dir), "", {**BASE_SETTINGS, **GPU_SETTINGS, "dataset.resolution": resolution,
                                                      "training.gradient_checkpointing": checkpointing}), Path("."))
        cache[key] = count_step(model_dir, job)
    return cache[key]


class Budget:
    """Wall-clock budget of the suite: a run starts only if its expected duration still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.took: dict[str, float] = {}  # model preset -> duration of its last run

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def expect(self, model: str, compile_: bool) -> float:
        base = self.took.get(model, FIRST_RUN_GUESS_S.get(model, 60.0))
        return base + (COMPILE_EXTRA_S.get(model, 60.0) if compile_ else 0.0)

    def fits(self, model: str, compile_: bool) -> bool:
        return self.elapsed() + self.expect(model, compile_) <= self.seconds


def _plan(configs: list, dry: bool, peers: dict[str, Path | None]) -> list[dict[str, Any]]:
    """Every run of the suite, in priority order."""
    plan = []
    for index, (label, ckpt, scope, graphs, only) in enumerate(VARIANTS):
        for name, model, resolution, batches in configs:
            for batch in batches:
                if only is None or (name, batch) in only:
                    plan.append({"config": name, "model": model, "resolution": resolution, "batch": batch,
                                 "row": "ours", "variant": label, "checkpointing": ckpt, "compile": bool(scope),
                                 "compile_scope": scope or "blocks", "cuda_graphs": graphs})
        if index == 0:  # the peers right after ours eager: the comparison the suite exists for
            for name, model, resolution, batches in configs:
                script = peers.get(model)
                for batch in batches:
                    plan.append({"config": name, "model": model, "resolution": resolution, "batch": batch,
                                 "row": "peer", "variant": "eager", "checkpointing": False, "compile": False,
                                 "script": str(script) if script else None})
    return plan


def gpu_suite(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.models import make_dataset, model_folder
    from benchmarks.peer import script_identity
    from benchmarks.run import BASE_SETTINGS, _worker_env, machine_info, run_one, versions, write_section

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: --suite gpu needs a CUDA GPU (use --dry-run to walk the path on a CPU)")
    budget = Budget(args.budget_s if args.budget_s else (1e9 if dry else DEFAULT_BUDGET_S))
    configs = DRY_CONFIGS if dry else CONFIGS
    scripts = {"sd1": args.peer_script, "sdxl": getattr(args, "peer_script_sdxl", None)}
    if dry:
        scripts = {"tiny": args.peer_script}
    peers = {m: script_identity(p, args.peer_commit) for m, p in scripts.items() if p}
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = dense_bf16_peak(device_name)
    models: dict[str, Path] = {}
    datasets: dict[int, Path] = {}
    for _, model, resolution, batches in configs:
        if model not in models:
            models[model], _ = model_folder(model, args.model_cache)
        if resolution not in datasets:
            # Two full batches of the largest batch size, one bucket (square images).
            count = 2 * max(b for *_, bs in configs for b in bs)
            datasets[resolution] = make_dataset(args.model_cache.parent / "data" / f"{count}x{resolution}", count,
                                                resolution)
    setup_s = budget.elapsed()
    flops_cache: dict = {}
    results = []
    steps, warmup = (3, 1) if dry else (args.steps, args.warmup)
    precision = "no" if dry and not torch.cuda.is_available() else "bf16"
    for item in _plan(configs, dry, {m: Path(p["path"]) for m, p in peers.items()}):
        entry = dict(item)
        if item["row"] == "peer" and not item.get("script"):
            entry["skipped"] = "no reference script given for this model (--peer-script / --peer-script-sdxl)"
            results.append(entry)
            continue
        if item["row"] == "ours" and dry and item["compile"]:
            # A CPU compile takes minutes and teaches nothing about GPU speed: the dry run only checks that the row's
            # settings still make a valid job on a GPU (tests/engine/test_compile.py trains compiled for real).
            entry["skipped"] = "compile is left out of a dry run"
            entry["problems"] = _row_problems(item)
            results.append(entry)
            continue
        if not budget.fits(item["model"], item["compile"]):
            entry["skipped"] = (f"over the time budget ({budget.elapsed():.0f} s of {budget.seconds:.0f} s used; this "
                                f"run would take ~{budget.expect(item['model'], item['compile']):.0f} s)")
            results.append(entry)
            continue
        common = {"model_dir": str(models[item["model"]]), "dataset_dir": str(datasets[item["resolution"]]),
                  "steps": steps + (4 if item["compile"] else 0), "warmup": warmup + (4 if item["compile"] else 0),
                  "label": f"{item['config']} b{item['batch']} {item['row']} {item['variant']}"}
        if item["row"] == "peer":
            spec = {**common, "kind": "peer", "script": item["script"], "python": sys.executable,
                    "resolution": item["resolution"], "batch_size": item["batch"], "rank": 4,
                    "mixed_precision": precision, "gradient_checkpointing": item["checkpointing"]}
        else:
            settings = {**BASE_SETTINGS, **GPU_SETTINGS, **_parse_overrides(args), "dataset.resolution": item["resolution"],
                        "training.batch_size": item["batch"], "training.mixed_precision": precision,
                        **_row_settings(item)}
            spec = {**common, "settings": settings, "cache_dir": None, "count_flops": False,
                    "sync_debug": bool(args.sync_debug)}
        started = time.perf_counter()
        run = run_one(spec, in_process=args.in_process and item["row"] != "peer", env=_worker_env(args))
        budget.took[item["model"]] = time.perf_counter() - started - (
            COMPILE_EXTRA_S.get(item["model"], 0.0) if item["compile"] else 0.0)
        entry.update(_figures(run, item, flops_cache, models, peak))
        entry["wall_s"] = time.perf_counter() - started
        entry["run"] = run
        results.append(entry)
        print(f"[gpu] {common['label']}: " + (f"{entry['images_per_s']:.2f} img/s" if entry.get("images_per_s")
                                              else f"FAILED: {run.get('error')}"), file=sys.stderr, flush=True)
    report = {
        "schema_version": 1, "suite": "gpu-dry" if dry else "gpu",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "versions": versions(), "device_name": device_name,
        "dense_bf16_peak_tflops": peak, "budget_s": budget.seconds, "setup_s": setup_s, "elapsed_s": budget.elapsed(),
        "steps": steps, "warmup": warmup, "precision": precision,
        "peers": peers, "results": results,
    }
    path = args.json or (args.model_cache.parent / ("gpu-dry.json" if dry else "gpu.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    text = gpu_markdown(report)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.results_md:
        write_section(args.results_md, args.section or report["suite"], text)
    print(text)
    print(f"JSON: {path}", file=sys.stderr)
    failed = [r for r in results if "run" in r and not r["run"].get("ok")]
    return 1 if failed else 0


def _row_settings(item: dict[str, Any]) -> dict[str, Any]:
    """The job settings that make one row's variant."""
    return {"training.gradient_checkpointing": item["checkpointing"], "training.compile": item["compile"],
            "training.compile_scope": item["compile_scope"], "training.cuda_graphs": item["cuda_graphs"]}


def _row_problems(item: dict[str, Any]) -> list[str]:
    """What the job's validation says of a row's settings on a CUDA device (empty: the row would run)."""
    from studio.engine.config import Job, apply_overrides, validate

    job = Job()
    apply_overrides(job, _row_settings(item))
    return [str(p) for p in validate(job, check_paths=False, device_type="cuda") if p.severity == "error"]


def _parse_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.run import parse_set

    return parse_set(args.overrides)


def _figures(run: dict[str, Any], item: dict[str, Any], flops_cache: dict, models: dict[str, Path],
             peak: float | None) -> dict[str, Any]:
    """img/s, FLOPs, MFU and memory of one run (FLOPs counted for ours' settings: the peer trains the same LoRA
    math, so the same count is its useful work, plus its per-step VAE/text encoding that is not counted)."""
    out: dict[str, Any] = {"ok": bool(run.get("ok")), "error": run.get("error")}
    sps = run.get("seconds_per_step")
    if not (run.get("ok") and sps):
        return out
    flops = _counted_flops(flops_cache, models[item["model"]], item["resolution"], item["checkpointing"])
    step_flops = flops["unet_step_flops"] * item["batch"]
    achieved = step_flops / sps / 1e12
    out.update(seconds_per_step=sps, images_per_s=item["batch"] / sps, step_tflop=step_flops / 1e12,
               achieved_tflops=achieved, mfu=achieved / peak if peak else None,
               gpu_peak_allocated_bytes=run.get("gpu_peak_allocated_bytes"),
               gpu_peak_reserved_bytes=run.get("gpu_peak_reserved_bytes"), peak_rss_bytes=run.get("peak_rss_bytes"),
               host_syncs_per_step=run.get("host_syncs_per_step"), first_step_s=run.get("first_step_s"))
    return out


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "gib":
        return f"{value / 2**30:.1f} GiB"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def gpu_markdown(report: dict[str, Any]) -> str:
    v, m = report["versions"], report["machine"]
    gpu = m.get("gpu") or {}
    peak = report["dense_bf16_peak_tflops"]
    lines = [
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Device: {report['device_name'] or 'no GPU (dry run)'}"
        + (f", {gpu['total_bytes'] / 2**30:.0f} GiB, CUDA {gpu['cuda']}" if gpu else "")
        + (f"; MFU against its dense bf16 peak, {peak:g} TFLOP/s (datasheet)" if peak else
           "; its dense bf16 peak is not in the table: MFU not given"),
        f"- Versions: Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, "
        f"accelerate {v['accelerate']}, transformers {v['transformers']}",
        f"- {report['steps']} steps per run ({report['warmup']} warm-up; compiled runs 4 more of each), "
        f"{report['precision']}, LoRA rank 4 on the attention projections on every row (the peer scripts' own "
        f"LoRA); FLOPs counted on the meta device for ours' step (the peers also encode images and captions every "
        f"step, not counted); suite time {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget "
        f"(set-up {report['setup_s']:.0f} s).",
    ]
    for model, p in (report.get("peers") or {}).items():
        lines.append(f"- Peer for {model}: `{Path(p['path']).name}` at diffusers commit `{p['diffusers_commit']}`, "
                     "unmodified.")
    lines += ["", "| config | batch | row | variant | img/s | s/step | TFLOP/step | TFLOP/s | MFU | peak alloc | "
              "peak reserved | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        note = r.get("skipped") or (r.get("error") or "")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['row']} | {r['variant']} | {_fmt(r.get('images_per_s'))} | "
            f"{_fmt(r.get('seconds_per_step'))} | {_fmt(r.get('step_tflop'))} | {_fmt(r.get('achieved_tflops'))} | "
            f"{_fmt(r.get('mfu'), 'pct')} | {_fmt(r.get('gpu_peak_allocated_bytes'), 'gib')} | "
            f"{_fmt(r.get('gpu_peak_reserved_bytes'), 'gib')} | {note} |")
    return "\n".join(lines) + "\n"
