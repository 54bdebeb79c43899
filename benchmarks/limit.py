"""The CPU limit suite (issue 17 §1): ours beside the bare loop (the limit) and diffusers' reference script (the peer).

All three train the same small SD-architecture model on the same 64 images at 256 px, rank 4 on the attention
projections (the script's targets: to_q/to_k/to_v/to_out.0), fp32, at batch 1 and 4. Each run is a fresh process;
within a repetition the three run back to back and the order reverses every repetition (ours, bare, peer; peer,
bare, ours; ...), so a machine shared with other work drifts into every row alike. Ratios are medians over
repetitions of the ratio within one repetition. ``ours / bare`` must stay <= 1.05 (a regression there is a bug).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# The comparison's settings, equal on every row: the script's LoRA (rank 4, alpha = rank, attention projections),
# fp32, its gradient clipping (1.0, our default too).
RANK = 4
LIMIT_SETTINGS: dict[str, Any] = {
    "lora.rank": RANK, "lora.alpha": float(RANK), "lora.targets": "attention", "training.mixed_precision": "no",
}
ROWS = ("ours", "bare", "peer")


def _order(rep: int, rows: list[str]) -> list[str]:
    return rows if rep % 2 == 0 else list(reversed(rows))


def _spec(row: str, ctx: dict[str, Any], batch: int) -> dict[str, Any]:
    from benchmarks.run import BASE_SETTINGS

    common = {"model_dir": str(ctx["model_dir"]), "dataset_dir": str(ctx["dataset_dir"]), "steps": ctx["steps"],
              "warmup": ctx["warmup"], "label": row}
    if row == "ours":
        settings = {**BASE_SETTINGS, **LIMIT_SETTINGS, "dataset.resolution": ctx["resolution"],
                    "training.batch_size": batch}
        return {**common, "settings": settings, "cache_dir": None, "count_flops": False}
    if row == "bare":
        from studio.engine.families import get_family

        return {**common, "kind": "bare", "resolution": ctx["resolution"], "batch_size": batch, "rank": RANK,
                "target_modules": get_family("sd1").lora_targets("attention", "unet")}
    return {**common, "kind": "peer", "resolution": ctx["resolution"], "batch_size": batch, "rank": RANK,
            "script": str(ctx["peer"]["path"]), "python": ctx["peer_python"], "mixed_precision": "no"}


def run_worker_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one bare or peer spec (in the benchmark's worker process)."""
    if spec.get("kind") == "bare":
        from benchmarks.bare import bare_run

        return {"label": "bare", **bare_run(spec["model_dir"], spec["dataset_dir"], resolution=spec["resolution"],
                                            batch_size=spec["batch_size"], steps=spec["steps"], warmup=spec["warmup"],
                                            rank=spec["rank"], target_modules=spec["target_modules"])}
    from benchmarks.peer import peer_run

    return peer_run(spec)


def _ratio(runs: dict[str, list[dict]], top: str, bottom: str, key: str = "seconds_per_step") -> float | None:
    """Median over repetitions of top/bottom, each pair from the same repetition."""
    values = []
    for a, b in zip(runs[top], runs[bottom]):
        if a.get("ok") and b.get("ok") and a.get(key) and b.get(key):
            values.append(a[key] / b[key])
    return statistics.median(values) if values else None


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok") and isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def peer_versions(python: str) -> dict[str, str] | None:
    code = ("import json, platform, torch, diffusers, peft, accelerate, transformers, torchvision, datasets; "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'diffusers': diffusers.__version__, 'peft': peft.__version__, "
            "'accelerate': accelerate.__version__, 'transformers': transformers.__version__, "
            "'datasets': datasets.__version__}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip().splitlines()[-1:]}


def limit_suite(args: argparse.Namespace) -> int:
    from benchmarks.models import make_dataset, model_folder
    from benchmarks.peer import script_identity
    from benchmarks.run import _report, _worker_env, _write, run_one

    dry = args.dry_run
    model = "tiny" if dry else "small"
    model_dir, native = model_folder(model, args.model_cache)
    resolution = native if dry else 256
    images = 4 if dry else 64
    dataset = make_dataset(args.model_cache.parent / "data" / f"{images}x{resolution}", images, resolution)
    peer = script_identity(args.peer_script, args.peer_commit) if args.peer_script else None
    ctx: dict[str, Any] = {
        "model": model, "model_dir": model_dir, "dataset_dir": dataset, "resolution": resolution,
        "settings": dict(LIMIT_SETTINGS), "steps": 3 if dry else args.steps, "warmup": 1 if dry else args.warmup,
        "in_process": args.in_process, "env": _worker_env(args), "peer": peer,
        "peer_python": str(args.peer_python or sys.executable),
    }
    rows = [r for r in ROWS if r != "peer" or peer]
    batches = [1, 2] if dry else [int(b) for b in args.batch_sizes.split(",")]
    experiments: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        out = _report(args, ctx, experiments)
        out["suite"] = "limit"
        out["peer"] = peer
        out["peer_not_run"] = None if peer else "no --peer-script given"
        if peer:
            out["peer_versions"] = versions_of_peer
        return out

    versions_of_peer = peer_versions(ctx["peer_python"]) if peer else None
    section = args.section or ("limit-dry" if dry else "limit")
    for batch in batches:
        runs: dict[str, list[dict]] = {r: [] for r in rows}
        for rep in range(1 if dry else args.repeats):
            for row in _order(rep, rows):
                spec = _spec(row, ctx, batch)
                # The peer runs in its own interpreter (it needs torchvision); ours and the bare loop in this one.
                result = run_one(spec, in_process=ctx["in_process"] and row != "peer", env=ctx["env"])
                runs[row].append(result)
                sps = result.get("seconds_per_step")
                print(f"[limit b{batch}] rep {rep + 1} {row}: "
                      + (f"{sps:.3f} s/step" if result.get("ok") and sps else f"FAILED: {result.get('error')}"),
                      file=sys.stderr, flush=True)
        experiments.append({
            "name": f"limit-b{batch}", "title": f"batch {batch}", "batch_size": batch, "rows": rows,
            "order": "reversed every repetition (ours, bare, peer; peer, bare, ours; ...)",
            "variants": [{"label": r, "median": {k: _median(runs[r], k) for k in
                                                 ("seconds_per_step", "images_per_s", "peak_rss_bytes")},
                          "runs": runs[r]} for r in rows],
            "ratio": {"ours_over_bare": _ratio(runs, "ours", "bare"),
                      "ours_over_peer": _ratio(runs, "ours", "peer") if peer else None,
                      "rss_ours_over_peer": _ratio(runs, "ours", "peer", "peak_rss_bytes") if peer else None},
            "load_average": [r.get("load_average_before") for rs in runs.values() for r in rs],
        })
        if batch != batches[-1]:  # what is measured so far is kept, should a long run be stopped
            _write(args, report(), section, markdown_fn=limit_markdown)
    return _write(args, report(), section, markdown_fn=limit_markdown)


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "mib":
        return f"{value / 2**20:,.0f} MiB"
    return f"{value:.3g}"


def limit_markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    m = report["machine"]
    loads = [load for e in report["experiments"] for load in e["load_average"] if load]
    lines = [
        f"Measured {report['created']} with `{report['command']}`.",
        "",
        f"- Machine: {m['cpu']}, {m['physical_cores']} cores (torch uses {m['torch_threads']}); no GPU. "
        + (f"1-min load average before each run: {min(x[0] for x in loads):.1f}–{max(x[0] for x in loads):.1f} "
           f"(the machine was shared; the rows alternate, so the load falls on each alike)." if loads else ""),
        f"- Ours and bare: Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, "
        f"accelerate {v['accelerate']}, transformers {v['transformers']}.",
    ]
    if report.get("peer"):
        p, pv = report["peer"], report.get("peer_versions") or {}
        lines.append(f"- Peer: diffusers' `{Path(p['path']).name}` at commit `{p['diffusers_commit']}` "
                     f"(sha256 {p['sha256'][:12]}…), run unmodified; its interpreter: "
                     + ", ".join(f"{k} {val}" for k, val in pv.items()) + ".")
    else:
        lines.append(f"- Peer: not run ({report.get('peer_not_run')}).")
    lines += [
        f"- Model {report['model']} at {report['resolution']} px, rank {RANK} on the attention projections, fp32; "
        f"{report['steps']} steps per run, the first {report['warmup']} left out; {report['repeats']} repetition(s).",
        "",
        "| batch | bare s/step | ours s/step | peer s/step | ours / bare | ours / bare, CPU time | ours / peer "
        "| peer / ours (speed-up) | peak RSS ours | peak RSS peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["experiments"]:
        med = {var["label"]: var["median"] for var in e["variants"]}
        runs = {var["label"]: var["runs"] for var in e["variants"]}
        r = e["ratio"]
        ours_peer = r.get("ours_over_peer")
        # CPU time per step (all threads): the work itself, far less sensitive than wall time to the share of a
        # busy machine a run got (the peer's is not known per step).
        cpu = _ratio(runs, "ours", "bare", "cpu_seconds_per_step")
        lines.append(
            f"| {e['batch_size']} | {_fmt(med['bare']['seconds_per_step'], 's')} | "
            f"{_fmt(med['ours']['seconds_per_step'], 's')} | {_fmt(med.get('peer', {}).get('seconds_per_step'), 's')} | "
            f"{_fmt(r['ours_over_bare'], 'x')} | {_fmt(cpu, 'x')} | {_fmt(ours_peer, 'x')} | "
            f"{_fmt(1 / ours_peer if ours_peer else None, 'x')} | {_fmt(med['ours']['peak_rss_bytes'], 'mib')} | "
            f"{_fmt(med.get('peer', {}).get('peak_rss_bytes'), 'mib')} |")
    return "\n".join(lines) + "\n"


def render(paths: list[Path]) -> str:
    """The markdown of one or more limit-suite JSON files (e.g. batch sizes measured by runs side by side)."""
    return "\n".join(limit_markdown(json.loads(Path(p).read_text())) for p in paths)


if __name__ == "__main__":
    print(render([Path(a) for a in sys.argv[1:]]))
