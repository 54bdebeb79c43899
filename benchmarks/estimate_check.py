"""The estimate checked out of sample (issue 14 item 7): measured runs on settings its constants were not fitted on.

``python -m benchmarks.run --suite estimate`` trains each configuration below once (a fresh process each) and
records, per run, the model's configs, the job settings, the measured seconds per step and the matmul throughput
the run's own pre-flight calibration saw. The two ``fit`` configurations are what the CPU constants
(``ACHIEVED_FRACTION`` and ``OP_OVERHEAD_FLOPS``) are solved from (``fit_cpu_constants``); every other one is held
out. ``evaluate`` re-computes the engine's *current* estimate for a recorded run, with the recorded calibration,
so the same file checks the estimate whenever it changes (tests/engine/test_estimate.py reads it).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "estimate-cpu.json"

# (name, role, model preset, resolution, job settings). Previews off: the step time is what is checked.
CONFIGS: list[tuple[str, str, str, int, dict[str, Any]]] = [
    ("small-256-b1", "fit", "small", 256, {}),
    ("tiny-64-b1", "fit", "tiny", 64, {}),
    ("small-192-b2-attention-r4", "held-out", "small", 192,
     {"training.batch_size": 2, "lora.targets": "attention", "lora.rank": 4, "lora.alpha": 4.0}),
    ("small-320-b1-conv-r8", "held-out", "small", 320, {"lora.targets": "+conv", "lora.rank": 8, "lora.alpha": 8.0}),
    ("small-256-b4", "held-out", "small", 256, {"training.batch_size": 4}),
    ("small-256-b1-checkpointing-r32", "held-out", "small", 256,
     {"training.gradient_checkpointing": True, "lora.rank": 32, "lora.alpha": 32.0}),
    ("small-256-b1-uncached", "held-out", "small", 256,
     {"training.cache_latents": False, "training.cache_text_embeddings": False}),
    ("tiny-64-b4-conv-r8", "held-out", "tiny", 64,
     {"training.batch_size": 4, "lora.targets": "+conv", "lora.rank": 8, "lora.alpha": 8.0}),
]
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json")


def model_configs(model_dir: Path) -> dict[str, Any]:
    """The config files the estimate reads, so a recorded run can be re-estimated without the weights."""
    return {name: json.loads((Path(model_dir) / name).read_text()) for name in CONFIG_FILES
            if (Path(model_dir) / name).is_file()}


def record_of(name: str, role: str, model: str, resolution: int, settings: dict[str, Any], model_dir: Path,
              run: dict[str, Any]) -> dict[str, Any]:
    est = run.get("estimate") or {}
    return {"name": name, "role": role, "model": model, "resolution": resolution, "settings": settings,
            "configs": model_configs(model_dir), "ok": bool(run.get("ok")), "error": run.get("error"),
            "measured_seconds_per_step": run.get("seconds_per_step"),
            "calibrated_tflops": est.get("calibrated_tflops"),
            "estimate_at_the_time": est.get("seconds_per_step"),
            "load_average": run.get("load_average_before"), "step_seconds": run.get("step_seconds")}


def job_for(record: dict[str, Any], folder: Path) -> Any:
    """The recorded run's job, on a folder holding only the recorded configs."""
    from studio.engine.config import Job, apply_overrides

    for name, config in record["configs"].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    job = Job()
    job.model.path = str(folder)
    job.model.family = "sd1"
    job.sampling.every = 0
    apply_overrides(job, {"dataset.resolution": record["resolution"], **record["settings"]})
    return job


def evaluate(record: dict[str, Any]) -> dict[str, float]:
    """The current estimate of a recorded run (with the run's own calibration) and its error: measured/estimated - 1."""
    from studio.engine.estimate import estimate

    with tempfile.TemporaryDirectory(prefix="estimate-check-") as tmp:
        e = estimate(job_for(record, Path(tmp)), device="cpu", peak_tflops=record["calibrated_tflops"])
    measured = record["measured_seconds_per_step"]
    return {"estimated": e.seconds_per_step, "measured": measured, "error": measured / e.seconds_per_step - 1}


def cost_terms(record: dict[str, Any]) -> tuple[float, float]:
    """The two terms a CPU estimate adds, for a recorded run: (compute seconds at ACHIEVED_FRACTION 1,
    op seconds at OP_OVERHEAD_FLOPS 1e12). The estimate is compute / fraction + ops × OP_OVERHEAD_FLOPS / 1e12."""
    from studio.engine import estimate as est

    saved = dict(est.ACHIEVED_FRACTION), dict(est.OP_OVERHEAD_FLOPS)
    try:
        est.OP_OVERHEAD_FLOPS["cpu"] = 0.0
        est.ACHIEVED_FRACTION["cpu"] = 1.0
        compute = evaluate(record)["estimated"]
        est.OP_OVERHEAD_FLOPS["cpu"] = 1e12
        est.ACHIEVED_FRACTION["cpu"] = 1e30  # compute ~ 0: what remains is the op term
        ops = evaluate(record)["estimated"]
    finally:
        est.ACHIEVED_FRACTION.update(saved[0])
        est.OP_OVERHEAD_FLOPS.update(saved[1])
    return compute, ops


def fit_cpu_constants(records: list[dict[str, Any]]) -> dict[str, float]:
    """Solve measured = compute / fraction + ops × overhead on the two ``fit`` runs (batch 1, so the batch term is 1).

    Encoders are not involved (both fit runs cache), so their fraction plays no part.
    """
    fit = [r for r in records if r["role"] == "fit" and r["ok"]]
    if len(fit) != 2:
        raise ValueError(f"need the two fit runs, have {len(fit)}")
    (c1, o1), (c2, o2) = (cost_terms(r) for r in fit)
    m1, m2 = (r["measured_seconds_per_step"] for r in fit)
    det = c1 * o2 - c2 * o1
    inv_fraction = (m1 * o2 - m2 * o1) / det
    overhead = (c1 * m2 - c2 * m1) / det
    return {"ACHIEVED_FRACTION_cpu": 1 / inv_fraction, "OP_OVERHEAD_FLOPS_cpu": overhead * 1e12}


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for r in records:
        if r["ok"] and r["measured_seconds_per_step"] and r["calibrated_tflops"]:
            rows.append({"name": r["name"], "role": r["role"], **evaluate(r)})
    held = [row["error"] for row in rows if row["role"] == "held-out"]
    return {"rows": rows, "held_out": {
        "count": len(held), "low": min(held, default=None), "high": max(held, default=None),
        "median_abs": statistics.median(abs(x) for x in held) if held else None}}


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    commands = " and ".join(f"`{c}`" for c in report.get("commands") or [report["command"]])
    loads = [r["load_average"][0] for r in report["records"] if r.get("load_average")]
    lines = [f"Measured {report['created']} with {commands} (run side by side); errors re-computed with the "
             f"estimate as committed (`python -m benchmarks.estimate_check`)."
             + (f" 1-min load average at the runs' start: {min(loads):.1f}–{max(loads):.1f} on "
                f"{report['machine']['logical_cpus']} CPUs." if loads else ""), "",
             "| configuration | role | measured s/step | estimated s/step | measured / estimated − 1 |",
             "|---|---|---|---|---|"]
    for row in s["rows"]:
        lines.append(f"| {row['name']} | {row['role']} | {row['measured']:.3f} | {row['estimated']:.3f} | "
                     f"{100 * row['error']:+.0f} % |")
    h = s["held_out"]
    if h["count"]:
        lines += ["", f"Held out ({h['count']} configurations): measured time fell between {100 * h['low']:+.0f} % and "
                  f"{100 * h['high']:+.0f} % of the estimate, median |error| {100 * h['median_abs']:.0f} %."]
    return "\n".join(lines) + "\n"


def estimate_suite(args: Any) -> int:
    """Measure every configuration once and write the records (JSON) and the error table (markdown)."""
    from benchmarks.models import make_dataset, model_folder
    from benchmarks.run import BASE_SETTINGS, _report, _worker_env, run_one

    records: list[dict[str, Any]] = []
    configs = CONFIGS[:2] if args.dry_run else CONFIGS
    if args.only:
        configs = [c for c in configs if c[0] in args.only.split(",")]
    for name, role, model, resolution, settings in configs:
        model = "tiny" if args.dry_run else model
        resolution = 64 if args.dry_run else resolution
        model_dir, _ = model_folder(model, args.model_cache)
        dataset = make_dataset(args.model_cache.parent / "data" / f"8x{resolution}", 8, resolution)
        merged = {**BASE_SETTINGS, "dataset.resolution": resolution, **settings}
        spec = {"model_dir": str(model_dir), "dataset_dir": str(dataset), "settings": merged,
                "steps": 3 if args.dry_run else args.steps, "warmup": 1 if args.dry_run else args.warmup,
                "label": name, "cache_dir": None, "count_flops": False}
        run = run_one(spec, in_process=args.in_process, env=_worker_env(args))
        print(f"[estimate] {name}: measured {run.get('seconds_per_step')} s/step", flush=True)
        records.append(record_of(name, role, model, resolution, merged, model_dir, run))
        text = _save(args, records)  # after every run: a long suite stopped early keeps what it measured
    print(text)
    return 0 if all(r["ok"] for r in records) else 1


def _save(args: Any, records: list[dict[str, Any]]) -> str:
    from benchmarks.run import _report

    ctx = {"model": "small + tiny", "resolution": "various", "settings": {}, "steps": args.steps,
           "warmup": args.warmup}
    report = _report(args, ctx, [])
    report["suite"] = "estimate"
    report["records"] = records
    report["summary"] = summary(records)
    path = args.json or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return text


def merge(paths: list[Path], out: Path = RESULTS) -> dict[str, Any]:
    """One results file from several runs of the suite (e.g. two halves run side by side), records in CONFIGS order."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    order = {c[0]: i for i, c in enumerate(CONFIGS)}
    merged = dict(reports[0])
    merged["records"] = sorted((r for rep in reports for r in rep["records"]), key=lambda r: order.get(r["name"], 99))
    merged["commands"] = [rep["command"] for rep in reports]
    merged["summary"] = summary(merged["records"])
    out.write_text(json.dumps(merged, indent=1, default=str), encoding="utf-8")
    return merged


def main(argv: list[str] | None = None) -> int:
    """Re-evaluate the recorded runs with the current estimate (and show what the fit runs imply);
    ``--merge A.json B.json``: first combine the results of suite runs made side by side."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--merge"]:
        merge([Path(a) for a in argv[1:]])
    report = json.loads(RESULTS.read_text())
    report["summary"] = summary(report["records"])
    print(markdown(report))
    print("constants solved from the fit runs:", fit_cpu_constants(report["records"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
