"""Benchmark entry point: measure the real engine's speed and memory, A/B the speed techniques, write JSON + markdown.

Examples (from the repository root)::

    python -m benchmarks.run                                   # the small CPU model, default settings, one run
    python -m benchmarks.run --compare caching --repeats 3     # a technique on and off, interleaved, as a ratio
    python -m benchmarks.run --compare training.attention=sdpa,classic
    python -m benchmarks.run --suite cpu --repeats 3 --results-md benchmarks/RESULTS.md
    python -m benchmarks.run --suite limit --peer-script PATH   # ours vs the bare loop vs diffusers' script (CPU)
    python -m benchmarks.run --suite estimate                  # the estimate on held-out settings (CPU)
    benchmarks/gpu_suite.sh run                                # on a GPU machine: SD1.5-512 + SDXL-1024, < 8 min

Every measured run happens in a fresh worker process (``--in-process`` turns that off), so peak RSS, cold load
time and torch.compile caches belong to that run alone. A and B repetitions alternate (A B, B A, A B, ...) so
that a machine shared with other work drifts into both sides equally; ratios are medians of adjacent pairs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "out"
SCHEMA_VERSION = 1

# What every benchmark job sets unless told otherwise: the app's defaults, with memory caches (a disk cache would
# let later repetitions skip the encoding) and previews off (timed separately with --sample).
BASE_SETTINGS: dict[str, Any] = {
    "training.cache_latents": True,
    "training.cache_text_embeddings": True,
    "training.cache_to_disk": False,
    "training.mixed_precision": "auto",
    "training.seed": 0,
    "lora.rank": 16,
    "lora.alpha": 16.0,
    "dataset.bucket_step": 64,
}

# Each technique: two variants, the reference first; ratios are second / first.
TECHNIQUES: dict[str, dict[str, Any]] = {
    "caching": {
        "title": "Latent + text-embedding caching (memory)",
        "variants": [
            ("off", {"training.cache_latents": False, "training.cache_text_embeddings": False}),
            ("on", {"training.cache_latents": True, "training.cache_text_embeddings": True}),
        ],
    },
    "disk-cache": {
        "title": "Disk cache: first run (cold) vs a later run on the same images (warm)",
        "variants": [("cold", {"training.cache_to_disk": True}), ("warm", {"training.cache_to_disk": True})],
        "shared_cache": True,  # the warm variant reads what the cold one wrote; order is fixed (cold, warm)
    },
    "attention": {
        "title": "Attention: classic (math) vs PyTorch SDPA",
        "variants": [("classic", {"training.attention": "classic"}), ("sdpa", {"training.attention": "sdpa"})],
    },
    "bf16": {
        "title": "Mixed precision: fp32 vs bf16 autocast",
        "variants": [("fp32", {"training.mixed_precision": "no"}), ("bf16", {"training.mixed_precision": "bf16"})],
    },
    "checkpointing": {
        "title": "Gradient checkpointing",
        "variants": [("off", {"training.gradient_checkpointing": False}), ("on", {"training.gradient_checkpointing": True})],
    },
    "channels-last": {
        "title": "channels_last memory format",
        "variants": [("off", {"training.channels_last": False}), ("on", {"training.channels_last": True})],
    },
    "fused-optimizer": {
        "title": "AdamW: per-tensor loop vs foreach (CPU) / fused (CUDA)",
        "variants": [("loop", {"training.fused_optimizer": False}), ("fused", {"training.fused_optimizer": True})],
    },
    "compile": {
        "title": "torch.compile of the transformer blocks",
        "variants": [("eager", {"training.compile": False}), ("compiled", {"training.compile": True})],
        "warmup": 4,
        # One fresh inductor cache per experiment: the first compiled run pays a cold compile, later ones hit
        # the cache as a user's second run would. first_step_s of each run shows both.
        "fresh_inductor_cache": True,
    },
    "omp-wait": {
        "title": "OpenMP wait policy on a busy CPU: spin (default) vs passive (env, not a job field)",
        "variants": [("spin", {}, {"OMP_WAIT_POLICY": None}), ("passive", {}, {"OMP_WAIT_POLICY": "PASSIVE"})],
    },
    "batch": {
        "title": "Batch size 1 vs 4 with aspect buckets (3 buckets; compare images/s)",
        "variants": [("batch 1", {"training.batch_size": 1}), ("batch 4", {"training.batch_size": 4})],
        "mixed_aspect": True,
        "images": 24,
    },
}

CPU_SUITE = ["baseline", "omp-wait", "caching", "disk-cache", "attention", "bf16", "checkpointing", "channels-last",
             "fused-optimizer", "batch", "compile"]

METRICS = ["seconds_per_step", "cpu_seconds_per_step", "cores_busy", "images_per_s", "peak_rss_bytes",
           "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes",
           "cold_load_s", "cache_build_s", "setup_s", "time_to_first_sample_s", "sampling_s", "first_step_s",
           "utilisation", "achieved_tflops", "peak_tflops", "total_s"]


# --------------------------------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
                       "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
    return info


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------- running


def run_one(spec: dict[str, Any], *, in_process: bool, env: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Measure one run: in a fresh worker process (default) or here. ``env``: variables to set (None: unset)."""
    load_before = load_average()
    if in_process:
        result = _run_spec(spec)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
            spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps(spec))
            child = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                         PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
            for key, value in (env or {}).items():
                if value is None:
                    child.pop(key, None)
                else:
                    child[key] = value
            proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", str(spec_path), str(out_path)],
                                  cwd=ROOT, env=child, capture_output=True, text=True)
            if proc.returncode == 0 and out_path.is_file():
                result = json.loads(out_path.read_text())
            else:
                result = {"label": spec.get("label", ""), "settings": spec.get("settings"), "ok": False,
                          "error": f"worker exited with {proc.returncode}", "details": proc.stderr[-3000:]}
    result["load_average_before"] = load_before
    result["load_average_after"] = load_average()
    result["env"] = {k: v for k, v in (env or {}).items()}
    return result


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run: the engine (default), or the limit suite's bare loop or peer script (``kind``)."""
    if spec.get("kind") in ("bare", "peer"):
        from benchmarks.limit import run_worker_spec

        return run_worker_spec(spec)
    from benchmarks.measure import RunSpec, measure

    return measure(RunSpec(**spec))


def _worker(spec_path: str, out_path: str) -> int:
    import time

    started = time.perf_counter()
    import diffusers  # noqa: F401  (the heavy imports, timed here so no phase below pays for them)
    import torch  # noqa: F401

    import studio.engine.trainer  # noqa: F401

    import_s = time.perf_counter() - started
    result = _run_spec(json.loads(Path(spec_path).read_text()))
    result["import_s"] = import_s  # torch/diffusers import, paid once per process, outside every timed phase
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok") and isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {key: median_of(runs, key) for key in METRICS}
    fractions: dict[str, list[float]] = {}
    for r in runs:
        for k, v in (r.get("data_path") or {}).get("fraction_of_step", {}).items():
            fractions.setdefault(k, []).append(v)
    out["data_path_fraction"] = {k: statistics.median(v) for k, v in fractions.items()}
    errors = [r["estimate"]["error"] for r in runs if isinstance((r.get("estimate") or {}).get("error"), float)]
    out["estimate_error"] = statistics.median(errors) if errors else None
    estimates = [r["estimate"]["seconds_per_step"] for r in runs if (r.get("estimate") or {}).get("seconds_per_step")]
    out["estimate_seconds_per_step"] = statistics.median(estimates) if estimates else None
    memory = [r["estimate"]["memory_error"] for r in runs if (r.get("estimate") or {}).get("memory_error") is not None]
    out["estimate_memory_error"] = statistics.median(memory) if memory else None
    syncs = [r["host_syncs_per_step"] for r in runs if r.get("host_syncs_per_step") is not None]
    out["host_syncs_per_step"] = statistics.median(syncs) if syncs else None
    flops = [r["flops"] for r in runs if r.get("flops")]
    out["flops"] = flops[0] if flops else None
    out["runs_ok"] = sum(1 for r in runs if r.get("ok"))
    out["runs"] = len(runs)
    return out


def paired_ratio(a_runs: list[dict], b_runs: list[dict], key: str) -> float | None:
    """Median over repetitions of B/A, each pair measured back to back."""
    ratios = []
    for a, b in zip(a_runs, b_runs):
        va, vb = a.get(key), b.get(key)
        if a.get("ok") and b.get("ok") and isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
            ratios.append(vb / va)
    return statistics.median(ratios) if ratios else None


def experiment(name: str, title: str, variants: list[tuple], ctx: dict[str, Any], *, repeats: int,
               shared_cache: bool = False, steps: int | None = None, warmup: int | None = None,
               dataset: str | None = None, sample: bool = False, fresh_inductor_cache: bool = False) -> dict[str, Any]:
    """Run every variant ``repeats`` times, alternating the order, and summarise.

    A variant is ``(label, job settings)`` or ``(label, job settings, environment variables)``.
    """
    variants = [(v[0], v[1], v[2] if len(v) > 2 else {}) for v in variants]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    base_env = dict(ctx.get("env", {}))
    if fresh_inductor_cache:
        base_env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    for rep in range(repeats):
        order = variants if (rep % 2 == 0 or shared_cache) else list(reversed(variants))
        cache_dir = tempfile.mkdtemp(prefix="bench-cache-") if shared_cache else None
        for label, settings, env in order:
            merged = {**BASE_SETTINGS, **ctx["settings"], **settings}
            if sample:
                # Previews at step 0 (the base model) and at the end, with the app's default prompts and steps.
                merged["sampling.every"] = 1_000_000
            spec = {"model_dir": str(ctx["model_dir"]), "dataset_dir": str(dataset or ctx["dataset_dir"]),
                    "settings": merged, "steps": steps or ctx["steps"], "warmup": warmup or ctx["warmup"],
                    "label": label, "cache_dir": cache_dir, "count_flops": True, "sync_debug": ctx["sync_debug"]}
            result = run_one(spec, in_process=ctx["in_process"], env={**base_env, **env})
            runs[label].append(result)
            _progress(name, rep, label, result)
    out: dict[str, Any] = {
        "name": name, "title": title, "model": ctx["model"], "resolution": ctx["resolution"],
        "steps": steps or ctx["steps"], "warmup": warmup or ctx["warmup"], "repeats": repeats,
        "order": "fixed (cold, warm)" if shared_cache else "alternating (A B, B A, ...)",
        "variants": [{"label": label, "settings": settings, "env": env, "median": summarise(runs[label]),
                      "runs": runs[label]} for label, settings, env in variants],
    }
    if len(variants) == 2:
        a, b = runs[variants[0][0]], runs[variants[1][0]]
        out["ratio"] = {key: paired_ratio(a, b, key) for key in
                        ("seconds_per_step", "cpu_seconds_per_step", "images_per_s", "peak_rss_bytes", "gpu_peak_allocated_bytes",
                         "cache_build_s", "first_step_s")}
    return out


def _progress(name: str, rep: int, label: str, r: dict[str, Any]) -> None:
    if r.get("ok"):
        sps = r.get("seconds_per_step")
        text = (f"{sps:.3f} s/step, peak RSS {r.get('peak_rss_bytes', 0) / 2**20:.0f} MiB" if sps else "no steady steps")
    else:
        text = f"FAILED: {r.get('error')}"
    print(f"[{name}] rep {rep + 1} {label}: {text}", file=sys.stderr, flush=True)


def find_max_batch(ctx: dict[str, Any], settings: dict[str, Any], *, limit: int = 64) -> dict[str, Any]:
    """The largest power-of-two batch that trains a few steps without running out of memory, then measured."""
    largest, trials = None, []
    batch = 1
    while batch <= limit:
        spec = {"model_dir": str(ctx["model_dir"]), "dataset_dir": str(ctx["dataset_dir"]),
                "settings": {**BASE_SETTINGS, **ctx["settings"], **settings, "training.batch_size": batch},
                "steps": 3, "warmup": 1, "label": f"batch {batch}", "cache_dir": None, "count_flops": False}
        result = run_one(spec, in_process=ctx["in_process"], env=ctx.get("env"))
        trials.append({"batch_size": batch, "ok": result.get("ok"), "error": result.get("error"),
                       "gpu_peak_reserved_bytes": result.get("gpu_peak_reserved_bytes")})
        _progress("max-batch", 0, f"batch {batch}", result)
        if not result.get("ok"):
            break
        largest = batch
        batch *= 2
    return {"largest": largest, "trials": trials}


# ------------------------------------------------------------------------------------------------- report


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "bytes":
        return f"{value / 2**20:,.0f} MiB" if value < 10 * 2**30 else f"{value / 2**30:.1f} GiB"
    if kind == "pct":
        return f"{100 * value:.1f} %"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    gpu = m["gpu"]
    lines = [
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Machine: {m['cpu']}, {m['physical_cores']} cores / {m['logical_cpus']} threads (torch uses "
        f"{m['torch_threads']}, {m['cpu_capability']}), {m['ram_bytes'] / 2**30:.1f} GiB RAM; "
        + (f"GPU {gpu['name']} ({gpu['total_bytes'] / 2**30:.1f} GiB, CUDA {gpu['cuda']})" if gpu else "no GPU") + f"; {m['os']}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, "
        f"accelerate {v['accelerate']}, transformers {v['transformers']}",
        f"- Model: {report['model']} at {report['resolution']} px; {report['steps']} steps per run, the first "
        f"{report['warmup']} are warm-up; medians over {report['repeats']} repetition(s), each run in a fresh process.",
        f"- Base settings: {', '.join(f'{k}={v_}' for k, v_ in report['base_settings'].items())}",
        "",
    ]
    base = next((e for e in report["experiments"] if e["name"] == "baseline"), None)
    if base:
        s = base["variants"][0]["median"]
        lines += [
            "| metric | value |", "|---|---|",
            f"| steady-state time per step (median) | {_fmt(s['seconds_per_step'], 's')} s |",
            f"| CPU time per step (all threads) / cores kept busy | {_fmt(s['cpu_seconds_per_step'], 's')} s / "
            f"{_fmt(s['cores_busy'])} |",
            f"| images/s | {_fmt(s['images_per_s'])} |",
            f"| cold model load | {_fmt(s['cold_load_s'], 's')} s |",
            f"| cache build (latents + text) | {_fmt(s['cache_build_s'], 's')} s |",
            f"| setup (LoRA, optimizer, prepare) | {_fmt(s['setup_s'], 's')} s |",
            f"| time to first preview (from start) | {_fmt(s['time_to_first_sample_s'], 's')} s |",
            f"| first step (warm-up) | {_fmt(s['first_step_s'], 's')} s |",
            f"| peak RSS | {_fmt(s['peak_rss_bytes'], 'bytes')} |",
            f"| peak GPU memory allocated / reserved | {_fmt(s['gpu_peak_allocated_bytes'], 'bytes')} / "
            f"{_fmt(s['gpu_peak_reserved_bytes'], 'bytes')} |",
            f"| FLOPs per step (counted) | {_fmt((s['flops'] or {}).get('step_flops', 0) / 1e9)} GFLOP |",
            f"| achieved / measured peak | {_fmt(s['achieved_tflops'])} / {_fmt(s['peak_tflops'])} TFLOP/s "
            f"= {_fmt(s['utilisation'], 'pct')} |",
            f"| engine estimate of time per step | {_fmt(s['estimate_seconds_per_step'], 's')} s "
            f"(error {_fmt(s['estimate_error'], 'pct')}) |",
            "",
        ]
    rows = [e for e in report["experiments"] if e.get("ratio")]
    if rows:
        lines += [
            "| technique | A → B | s/step A | s/step B | time B/A | CPU-time B/A | images/s B/A | peak RSS A "
            "| peak RSS B | RSS B/A | GPU alloc B/A | util A / B | est. error A / B |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in rows:
            a, b = e["variants"][0], e["variants"][1]
            ma, mb, r = a["median"], b["median"], e["ratio"]
            fail = "" if ma["runs_ok"] == ma["runs"] and mb["runs_ok"] == mb["runs"] else " (some runs failed)"
            lines.append(
                f"| {e['title']}{fail} | {a['label']} → {b['label']} | {_fmt(ma['seconds_per_step'], 's')} | "
                f"{_fmt(mb['seconds_per_step'], 's')} | {_fmt(r['seconds_per_step'], 'ratio')} | "
                f"{_fmt(r['cpu_seconds_per_step'], 'ratio')} | {_fmt(r['images_per_s'], 'ratio')} | {_fmt(ma['peak_rss_bytes'], 'bytes')} | "
                f"{_fmt(mb['peak_rss_bytes'], 'bytes')} | {_fmt(r['peak_rss_bytes'], 'ratio')} | "
                f"{_fmt(r['gpu_peak_allocated_bytes'], 'ratio')} | {_fmt(ma['utilisation'], 'pct')} / "
                f"{_fmt(mb['utilisation'], 'pct')} | {_fmt(ma['estimate_error'], 'pct')} / {_fmt(mb['estimate_error'], 'pct')} |"
            )
        lines.append("")
    for e in report["experiments"]:
        extra = []
        for var in e["variants"]:
            med = var["median"]
            if med["data_path_fraction"] and not var["settings"].get("training.cache_latents", True):
                parts = ", ".join(f"{k} {_fmt(v_, 'pct')}" for k, v_ in sorted(med["data_path_fraction"].items())
                                  if k != "scan")
                extra.append(f"- {e['title']}, {var['label']}: share of a step spent in the data path: {parts}")
            if e["name"] in ("compile", "disk-cache") or med.get("host_syncs_per_step") is not None:
                extra.append(f"- {e['title']}, {var['label']}: first step {_fmt(med['first_step_s'], 's')} s, "
                             f"cache build {_fmt(med['cache_build_s'], 's')} s, whole run {_fmt(med['total_s'], 's')} s"
                             + (f", host syncs per step {med['host_syncs_per_step']}" if med.get("host_syncs_per_step")
                                is not None else ""))
        lines += extra
    for e in report.get("max_batch", []):
        lines.append(f"- Largest batch that fits, {e['name']}: {e['largest']} (tried "
                     + ", ".join(f"{t['batch_size']}{'' if t['ok'] else ' ✗'}" for t in e["trials"]) + ")")
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str, text: str) -> None:
    """Replace the text between ``<!-- BEGIN section -->`` and ``<!-- END section -->`` (appending if absent)."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- CLI


def parse_set(items: list[str]) -> dict[str, Any]:
    from studio.engine.config import parse_cli_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got '{item}'")
        out[key.strip()] = parse_cli_value(value.strip())
    return out


def parse_compare(text: str) -> tuple[str, dict[str, Any]]:
    """A technique name, or ``KEY=A,B`` for any job field."""
    if text in TECHNIQUES:
        return text, TECHNIQUES[text]
    key, sep, values = text.partition("=")
    if not sep or "," not in values:
        raise SystemExit(f"error: --compare takes one of {', '.join(TECHNIQUES)} or KEY=A,B; got '{text}'")
    from studio.engine.config import parse_cli_value

    a, b = (v.strip() for v in values.split(",", 1))
    return key, {"title": key, "variants": [(a, {key: parse_cli_value(a)}), (b, {key: parse_cli_value(b)})]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="techniques for --compare: " + ", ".join(TECHNIQUES))
    p.add_argument("--model", default="small", help="small (CPU default), tiny, sd1, sdxl (random full-size "
                   "weights from the bundled configs) or a model path")
    p.add_argument("--resolution", type=int, help="training resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=13, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state median")
    p.add_argument("--images", type=int, default=8, help="images in the generated dataset")
    p.add_argument("--mixed-aspect", action="store_true", help="a dataset with landscape and portrait images too")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any job field, e.g. --set training.gradient_checkpointing=true")
    p.add_argument("--compare", action="append", default=[], metavar="TECHNIQUE|KEY=A,B",
                   help="measure two variants alternately and report B/A ratios (repeatable)")
    p.add_argument("--suite", choices=("cpu", "gpu", "limit", "estimate"), help="the full set of measurements for this "
                   "kind of machine; 'limit': ours beside the bare loop and diffusers' reference script (CPU); "
                   "'estimate': the pre-flight estimate against measured runs it was not fitted on")
    p.add_argument("--dry-run", action="store_true", help="--suite limit/gpu: the same path on the tiny model, a few "
                   "steps, on any machine (the test suite runs it so the suite never rots)")
    p.add_argument("--peer-script", type=Path, help="diffusers' examples/text_to_image/train_text_to_image_lora.py "
                   "(not in this repository: fetch diffusers and pass the file)")
    p.add_argument("--peer-commit", help="the diffusers commit the peer script came from (read from its git work "
                   "tree when there is one)")
    p.add_argument("--peer-python", type=Path, help="interpreter for the peer script (it needs torchvision and "
                   "datasets); default: this one")
    p.add_argument("--peer-script-sdxl", type=Path, help="--suite gpu: diffusers' "
                   "examples/text_to_image/train_text_to_image_lora_sdxl.py, the SDXL peer")
    p.add_argument("--batch-sizes", default="1,4", help="--suite limit: batch sizes to compare")
    p.add_argument("--only", help="--suite estimate: the configurations to measure (comma-separated names)")
    p.add_argument("--budget-s", type=float, help="--suite gpu: wall-clock budget; runs that would end past it are "
                   "skipped and listed (default 390 s, so the wrapper's whole run stays under 8 minutes)")
    p.add_argument("--repeats", type=int, default=1, help="repetitions of every variant")
    p.add_argument("--sample", action="store_true", help="also make previews (time to first sample)")
    p.add_argument("--max-batch", action="store_true", help="find the largest batch that fits (GPU)")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: count host syncs per training step")
    p.add_argument("--in-process", action="store_true", help="run measurements in this process (faster, less clean)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default=None,
                   help="OMP_WAIT_POLICY of the workers (default passive: on a CPU shared with other work, spinning "
                   "OpenMP threads make 2 threads several times slower than 1; 'inherit' keeps the environment's; "
                   "--suite estimate defaults to inherit: it checks the estimate against runs as the app makes "
                   "them, and on a quiet CPU passive waiting doubles a small model's step time)")
    p.add_argument("--model-cache", type=Path, default=DEFAULT_OUT / "models", help="where built models are kept")
    p.add_argument("--json", type=Path, help="result file (default: benchmarks/out/<time>.json)")
    p.add_argument("--markdown", type=Path, help="also write the markdown report to this file")
    p.add_argument("--results-md", type=Path, help="put the markdown tables into this file (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--section", help="marker name of the section in --results-md (default: the suite or 'run')")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.worker:
        return _worker(*args.worker)

    from benchmarks.models import make_dataset, model_folder

    if args.suite == "gpu":
        return _gpu_suite(args)
    if args.suite == "limit":
        from benchmarks.limit import limit_suite

        return limit_suite(args)
    if args.suite == "estimate":
        from benchmarks.estimate_check import estimate_suite

        return estimate_suite(args)
    model_dir, native = model_folder(args.model, args.model_cache)
    resolution = args.resolution or native
    data_root = args.model_cache.parent / "data"
    dataset = make_dataset(data_root / f"{args.images}x{resolution}{'-mixed' if args.mixed_aspect else ''}",
                           args.images, resolution, mixed_aspect=args.mixed_aspect)
    settings = {"dataset.resolution": resolution, "training.batch_size": args.batch_size, **parse_set(args.overrides)}
    ctx = {"model": args.model, "model_dir": model_dir, "dataset_dir": dataset, "resolution": resolution,
           "settings": settings, "steps": args.steps, "warmup": args.warmup, "in_process": args.in_process,
           "sync_debug": args.sync_debug, "env": _worker_env(args)}
    names = CPU_SUITE if args.suite == "cpu" else (args.compare or ["baseline"])
    experiments = []
    for name in names:
        if name == "baseline":
            experiments.append(experiment("baseline", "Baseline", [("default", {})], ctx, repeats=args.repeats,
                                          sample=args.sample or args.suite == "cpu"))
            continue
        key, technique = parse_compare(name)
        special: dict[str, Any] = {}
        if technique.get("mixed_aspect"):
            images = technique.get("images", args.images)
            special["dataset"] = make_dataset(data_root / f"{images}x{resolution}-mixed", images, resolution,
                                              mixed_aspect=True)
        experiments.append(experiment(key, technique["title"], technique["variants"], ctx, repeats=args.repeats,
                                      shared_cache=technique.get("shared_cache", False),
                                      fresh_inductor_cache=technique.get("fresh_inductor_cache", False),
                                      warmup=technique.get("warmup"), sample=args.sample, **special))
    report = _report(args, ctx, experiments)
    if args.max_batch:
        report["max_batch"] = [{"name": args.model, **find_max_batch(ctx, {})}]
    return _write(args, report, args.section or args.suite or "run")


def _worker_env(args: argparse.Namespace) -> dict[str, str | None]:
    policy = args.omp_wait_policy or ("inherit" if getattr(args, "suite", None) == "estimate" else "passive")
    if policy == "inherit" or args.in_process:
        return {}
    return {"OMP_WAIT_POLICY": policy.upper()}


def _report(args: argparse.Namespace, ctx: dict[str, Any], experiments: list[dict]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if args else [])),
        "machine": machine_info(),
        "versions": versions(),
        "model": ctx["model"],
        "resolution": ctx["resolution"],
        "steps": ctx["steps"],
        "warmup": ctx["warmup"],
        "repeats": args.repeats,
        "base_settings": {**BASE_SETTINGS, **ctx["settings"]},
        "worker_env": ctx.get("env", {}),
        "experiments": experiments,
    }


def _write(args: argparse.Namespace, report: dict[str, Any], section: str, markdown_fn: Any = None) -> int:
    path = args.json or DEFAULT_OUT / f"{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    text = (markdown_fn or markdown)(report)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.results_md:
        write_section(args.results_md, section, text)
    print(text)
    print(f"JSON: {path}", file=sys.stderr)
    failed = [r for e in report["experiments"] for v in e.get("variants", []) for r in v["runs"] if not r.get("ok")]
    return 1 if failed and not report.get("max_batch") else 0


def _gpu_suite(args: argparse.Namespace) -> int:
    from benchmarks.gpu_suite import gpu_suite

    return gpu_suite(args)


if __name__ == "__main__":
    sys.exit(main())
